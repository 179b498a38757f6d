"""OpenAI's Responses API (`POST /v1/responses`) on the chat machinery, as vLLM serves it for models without
Harmony's format.

A request becomes a chat request (its `instructions` the system message, its `input` items the messages, its
function tools and `text.format` the chat's tools and response format), so the answer is made and read as chat
answers are (thinking, tool calls in the model's format, structured outputs); the chat answer then becomes the
response's output items: a `reasoning` item with the thinking, a `message` with the text, a `function_call` per
call. Streamed, the chat deltas become the Responses events (`response.created`, `output_item.added`,
`output_text.delta`, ..., `response.completed`), framed `event: TYPE` / `data: JSON` as OpenAI's.

As vLLM without VLLM_ENABLE_RESPONSES_API_STORE: nothing is stored, so `previous_response_id` names no response
and `background` is refused; `store` is taken and ignored.
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from shardserve.router.errors import APIError
from shardserve.router.protocol import ChatCompletionRequest, OpenAIBase
from shardserve.sampling_params import ParameterError

if TYPE_CHECKING:
    from shardserve.lora.request import LoRARequest
    from shardserve.router.serving import OpenAIServing

_INVALID = "invalid_request_error"   # the type of the Responses API's own errors (vLLM's)
_LOGPROBS = "message.output_text.logprobs"   # the `include` entry that asks for the text's logprobs


class ResponsesRequest(OpenAIBase):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool | None = True
    text: dict[str, Any] | None = None          # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None     # {"effort": ...}
    include: list[str] | None = None
    top_logprobs: int | None = 0
    stream: bool = False
    store: bool | None = True
    background: bool | None = False
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = "disabled"
    service_tier: str = "auto"
    max_tool_calls: int | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    include_reasoning: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    priority: int = 0
    request_id: str | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request that makes this response's answer."""
        if self.background:
            raise APIError("This server does not support `store=True` and therefore does not support the "
                           "background mode (nothing is stored).", param="background", type=_INVALID)
        if self.previous_response_id is not None:
            raise not_stored(self.previous_response_id)
        self._check_tool_choice()
        logprobs = _LOGPROBS in (self.include or [])
        fields = {name: getattr(self, name) for name in (
            "model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "logit_bias",
            "include_reasoning", "skip_special_tokens", "include_stop_str_in_output", "chat_template_kwargs",
            "priority", "parallel_tool_calls") if getattr(self, name) is not None}
        if self.tools:
            fields |= {"tools": [_chat_tool(t) for t in self.tools], "tool_choice": _chat_tool_choice(self.tool_choice)}
        return ChatCompletionRequest(
            messages=self._messages(), max_completion_tokens=self.max_output_tokens, stream=self.stream,
            # streamed: the first chunk's prompt token ids tell the prompt's length, the last chunk the usage
            stream_options={"include_usage": True} if self.stream else None, return_token_ids=self.stream,
            logprobs=logprobs, top_logprobs=self.top_logprobs if logprobs else None,
            response_format=_response_format(self.text), reasoning_effort=(self.reasoning or {}).get("effort"),
            truncate_prompt_tokens=-1 if self.truncation == "auto" else None, **fields)

    def _check_tool_choice(self) -> None:
        """vLLM's rules: without tools the choice is "none" (a choice that needs a tool is refused), and a named
        choice names a given tool."""
        choice = self.tool_choice
        named = isinstance(choice, dict) and choice.get("type") == "function"
        if not self.tools:
            if choice == "required":
                raise ParameterError("Tool choice 'required' must be specified with 'tools' parameter.",
                                     "tool_choice")
            if named:
                raise ParameterError("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")
            self.tool_choice = "none"
        elif named and choice.get("name") not in {t.get("name") for t in self.tools if isinstance(t, dict)}:
            raise ParameterError("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")

    def _messages(self) -> list[dict[str, Any]]:
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for item in self.input:
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind == "message":
                messages.append({"role": item.get("role"), "content": _text(item.get("content"))})
            elif kind == "function_call":   # the model's earlier call: one assistant message holds a turn's calls
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
            elif kind != "reasoning":   # (earlier thinking is not shown to the model again)
                raise APIError(f"Input items of type {kind!r} are not supported (message, function_call, "
                               f"function_call_output, reasoning).", param="input")
        return messages


def not_stored(response_id: str) -> APIError:
    """A response asked for by its id: nothing is stored (vLLM's answer without its store)."""
    return APIError(f"Response with id '{response_id}' not found.", 404, param="response_id", type=_INVALID)


def _text(content) -> str:
    """A message's text: a string, or its text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError("A message's content is a string or a list of input_text parts.", param="input")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or \
                not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(f"Content parts of type {kind!r} are not supported (text only).", param="input")
        parts.append(part["text"])
    return "".join(parts)


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) as the chat's."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise APIError(f"Tools of type {kind!r} are not supported: function tools only.", param="tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                             if k in tool}}


def _chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}   # {"type", "name"}: Responses'
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                       if k in fmt}}
    return fmt


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat usage in the Responses API's words."""
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens") or 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": (usage.get("completion_tokens_details") or {}).get(
                "reasoning_tokens") or 0},
            "total_tokens": usage["total_tokens"]}


class _Response:
    """The response object of a request, as it stands."""

    def __init__(self, req: ResponsesRequest, serving: OpenAIServing, model: str):
        defaults = serving.engine.default_sampling_params
        self.req, self.max_model_len = req, serving.engine.max_model_len
        self.fields = {
            "id": f"resp_{req.request_id}" if req.request_id else _id("resp"), "object": "response",
            "created_at": int(time.time()), "status": "in_progress", "incomplete_details": None,
            "instructions": req.instructions, "metadata": req.metadata, "model": model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature if req.temperature is not None else defaults.get("temperature", 1.0),
            "tool_choice": req.tool_choice, "tools": req.tools,
            "top_p": req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
            "background": False, "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
            "previous_response_id": None, "reasoning": req.reasoning, "service_tier": req.service_tier,
            "text": req.text, "top_logprobs": req.top_logprobs if _LOGPROBS in (req.include or []) else None,
            "truncation": req.truncation, "usage": None, "user": req.user,
            "presence_penalty": req.presence_penalty if req.presence_penalty is not None else defaults.get(
                "presence_penalty", 0.0),
            "frequency_penalty": req.frequency_penalty if req.frequency_penalty is not None else defaults.get(
                "frequency_penalty", 0.0)}

    def prompt_tokens(self, prompt_tokens: int) -> None:
        """The output's room, once the prompt's length is known (vLLM's: what is left of the model's length)."""
        room = self.max_model_len - prompt_tokens
        given = self.req.max_output_tokens
        self.fields["max_output_tokens"] = room if given is None else min(given, room)

    def end(self, output: list[dict], finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        incomplete = finish_reason == "length"
        self.fields.update(status="incomplete" if incomplete else "completed", output=output,
                           usage=_responses_usage(usage),
                           incomplete_details={"reason": "max_output_tokens"} if incomplete else None)
        return self.fields


def _output_items(message: dict[str, Any], logprobs: dict | None) -> list[dict[str, Any]]:
    """A chat answer's message as the response's output items (vLLM's order: thinking, text, calls)."""
    items = []
    if message.get("reasoning"):
        items.append({"type": "reasoning", "id": _id("rs"), "summary": [], "status": None,
                      "content": [{"type": "reasoning_text", "text": message["reasoning"]}]})
    if message.get("content"):
        items.append({"type": "message", "id": _id("msg"), "status": "completed", "role": "assistant",
                      "content": [_output_text(message["content"], (logprobs or {}).get("content"))]})
    for call in message.get("tool_calls") or []:
        items.append(_function_call(call["id"], call["function"]["name"], call["function"]["arguments"],
                                    "completed"))
    return items


def _output_text(text: str, logprobs: list | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _function_call(call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


async def create_response(serving: OpenAIServing, req: ResponsesRequest, lora: LoRARequest | None
                          ) -> dict[str, Any] | AsyncIterator[str]:
    chat = req.to_chat()
    limit = serving.engine.max_model_len
    if req.max_output_tokens is not None and req.max_output_tokens > limit:   # (named as the request names it)
        raise ParameterError(f"max_output_tokens={req.max_output_tokens} cannot be greater than max_model_len="
                             f"{limit}. Please request fewer output tokens.", "max_output_tokens",
                             req.max_output_tokens)
    response = _Response(req, serving, lora.lora_name if lora else serving.model_name)
    answer = await serving.chat(chat, lora)
    if req.stream:
        return _stream(response, answer)
    (choice,) = answer["choices"]
    response.prompt_tokens(answer["usage"]["prompt_tokens"])
    return response.end(_output_items(choice["message"], choice["logprobs"]), choice["finish_reason"],
                        answer["usage"])


class _Events:
    """The Responses events of a streamed chat answer: one output item at a time (thinking, text, a call), each
    opened when its first delta comes and done when another begins or the answer ends."""

    def __init__(self):
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.item: dict[str, Any] | None = None   # the open item
        self.parts: list[str] = []                # its text (thinking, answer or arguments) so far
        self.logprobs: list = []

    def event(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"output_index": len(self.output), "item_id": self.item["id"]}

    def _open(self, item: dict[str, Any]) -> list[str]:
        events = self.close()
        self.item, self.parts, self.logprobs = item, [], []
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=item))
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                     part=_output_text("", [])))
        elif item["type"] == "reasoning":
            events.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                     part={"type": "reasoning_text", "text": ""}))
        return events

    def advance(self, delta: dict[str, Any], logprobs: list | None) -> list[str]:
        events = []
        if delta.get("reasoning"):
            if self.item is None or self.item["type"] != "reasoning":
                events += self._open({"type": "reasoning", "id": _id("rs"), "summary": [], "status": "in_progress"})
            self.parts.append(delta["reasoning"])
            events.append(self.event("response.reasoning_text.delta", **self._where(), content_index=0,
                                     delta=delta["reasoning"]))
        if delta.get("content"):
            if self.item is None or self.item["type"] != "message":
                events += self._open({"type": "message", "id": _id("msg"), "status": "in_progress",
                                      "role": "assistant", "content": []})
            self.parts.append(delta["content"])
            self.logprobs += logprobs or []
            events.append(self.event("response.output_text.delta", **self._where(), content_index=0,
                                     delta=delta["content"], logprobs=logprobs or []))
        for call in delta.get("tool_calls") or []:
            if call.get("id"):   # a call begins
                events += self._open(_function_call(call["id"], call["function"]["name"], "", "in_progress"))
            arguments = call.get("function", {}).get("arguments")
            if arguments:
                self.parts.append(arguments)
                events.append(self.event("response.function_call_arguments.delta", **self._where(),
                                         delta=arguments))
        return events

    def close(self) -> list[str]:
        """The open item's done events."""
        item, self.item = self.item, None
        if item is None:
            return []
        where, text = {"output_index": len(self.output), "item_id": item["id"]}, "".join(self.parts)
        if item["type"] == "message":
            part = _output_text(text, self.logprobs or None)
            events = [self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                      self.event("response.content_part.done", **where, content_index=0, part=part)]
            item = {**item, "status": "completed", "content": [part]}
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=text),
                      self.event("response.content_part.done", **where, content_index=0, part=part)]
            item = {**item, "status": "completed", "content": [part]}
        else:
            events = [self.event("response.function_call_arguments.done", **where, arguments=text,
                                 name=item["name"])]
            item = {**item, "status": "completed", "arguments": text}
        events.append(self.event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        return events


async def _stream(response: _Response, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    events, finish_reason, usage = _Events(), None, None
    async with contextlib.aclosing(chunks):   # closed with this stream: a request still running is aborted
        async for text in chunks:
            chunk = json.loads(text)
            if "prompt_token_ids" in chunk:   # the first chunk: the prompt's length is known, the response begins
                response.prompt_tokens(len(chunk["prompt_token_ids"]))
                yield events.event("response.created", response=response.fields) + \
                    events.event("response.in_progress", response=response.fields)
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                finish_reason = choice.get("finish_reason") or finish_reason
                found = events.advance(choice["delta"], (choice.get("logprobs") or {}).get("content"))
                if found:
                    yield "".join(found)
    yield "".join(events.close()) + events.event("response.completed",
                                                 response=response.end(events.output, finish_reason, usage))
