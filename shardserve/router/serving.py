"""The OpenAI-compatible completion and chat logic of one model: requests in, response bodies or stream
chunks out. It runs inside the model's replica, next to its async engine; the ingress only routes.

Streams carry DELTA outputs from the engine (only what is new in each: no request's whole token list is copied
per step); each becomes a chunk of JSON text.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps escapes strings with

from shardserve.beam_search import AsyncEngineBeamStepper, BeamSearchParams, run_beam_search
from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.reasoning import reasoning_parser_for
from shardserve.entrypoints.chat_utils import render_chat
from shardserve.entrypoints.prompt_embeds import decode_prompt_embeds
from shardserve.inputs import TokensPrompt
from shardserve.lora.request import LoRARequest
from shardserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from shardserve.router.errors import APIError
from shardserve.router.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest)
from shardserve.router.responses import ResponsesRequest, create_response
from shardserve.router.tool_calls import ChatAnswers, ToolCallParser
from shardserve.router.tool_tags import ToolStrictLevel
from shardserve.sampling_params import ParameterError, SamplingParams


_MIN_LOGPROB = -9999.0  # what OpenAI sends for -inf, which JSON cannot write


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
           reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage; with `cached_tokens` (--enable-prompt-tokens-details), the prompt tokens the prefix
    cache served; with `reasoning_tokens` (--reasoning-parser), the completion tokens spent thinking."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    name = req.unsupported()
    if name is not None:
        raise APIError(f"{name} is not supported by this server.", param=name)


def _stream_usage(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """vLLM's `stream_options`: a last chunk with the usage (`include_usage`), and with it the usage so far in
    every chunk (`continuous_usage_stats`). Options on a request that does not stream are refused."""
    options = req.stream_options
    if options is not None and not req.stream:
        raise APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    final = options is not None and options.include_usage
    return final, final and options.continuous_usage_stats


def _token_str(entry: PositionLogprobs, token_id: int, tokenizer, as_id: bool = False) -> str:
    """How a logprob entry names a token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
    if as_id:
        return f"token_id:{token_id}"
    lp = entry.get(token_id)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[RequestOutput]:
    """Interleave several requests' output streams as outputs arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def _chain(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async with contextlib.aclosing(rest):
        async for item in rest:
            yield item


@dataclass
class _Delta:
    text: str
    token_ids: list[int]
    logprobs: list                 # the new tokens' logprob entries
    text_offset: int               # where `text` starts in the choice's whole text
    first: bool                    # the choice's first chunk


class _StreamCursor:
    """What each streamed choice has been sent so far, from the engine's DELTA outputs; with `keep`, each choice's
    whole answer so far too (what reading tool calls and thinking takes)."""

    def __init__(self, keep: bool = False):
        self.sent: dict[int, tuple[int, int]] = {}   # choice index -> (chars, tokens) sent
        self.completion_tokens = 0
        self.whole: dict[int, CompletionOutput] | None = {} if keep else None

    def advance(self, index: int, c: CompletionOutput) -> _Delta | None:
        if not c.text and not c.token_ids and c.finish_reason is None:
            return None
        first = index not in self.sent
        chars, tokens = self.sent.get(index, (0, 0))
        self.sent[index] = (chars + len(c.text), tokens + len(c.token_ids))
        self.completion_tokens += len(c.token_ids)
        if self.whole is not None:
            if first:  # a copy of its own to fold the rest into (the first output's lists are read below)
                self.whole[index] = CompletionOutput(index, "", [], None, None)
            self.whole[index].add(c)
        return _Delta(c.text, c.token_ids, c.logprobs or [], chars, first)


def _json(value) -> str:
    """A chunk field as JSON: strings and nulls (nearly every field of every chunk) without json.dumps's per-call
    set-up, with the same escaping."""
    if value is None:
        return "null"
    if type(value) is str:
        return _json_str(value)
    return json.dumps(value)


class _ChunkEncoder:
    """A stream's chunks as JSON text, written from templates: what every chunk of the stream shares (id,
    object, created, model) is encoded once, the rest field by field. With 32 streams on 2 cores, building
    each chunk as a dict and encoding it whole made the event loop's pass over a step's chunks ~0.2 ms longer,
    and the engine waits for that pass (benchmarks/RESULTS.md)."""

    def __init__(self, meta: dict, object_: str):
        self._head = json.dumps({**meta, "object": object_})[:-1] + ', "choices": ['

    def choice(self, index: int, field: str, value: str, logprobs: dict | None, finish_reason: str | None,
               stop_reason: int | str | None, usage: dict | None = None, extra: dict | None = None,
               top: dict | None = None) -> str:
        """A chunk of one choice whose `field` ("text" of a completion, "delta" of a chat) is `value`, as JSON;
        `extra`: more fields of the choice, `top`: more fields of the chunk."""
        choice = '{"index": %d, "%s": %s, "logprobs": %s, "finish_reason": %s, "stop_reason": %s%s}' % (
            index, field, value, _json(logprobs), _json(finish_reason), _json(stop_reason), _fields(extra))
        return self._chunk(choice, usage, top)

    def usage(self, usage: dict) -> str:
        """The last chunk, with no choices."""
        return self._chunk("", usage)

    def _chunk(self, choice: str, usage: dict | None, top: dict | None = None) -> str:
        tail = "}" if usage is None else ', "usage": ' + json.dumps(usage) + "}"
        return self._head + choice + "]" + _fields(top) + tail


def _fields(fields: dict | None) -> str:
    """More fields for a JSON object being written, after a comma."""
    return "".join(f', "{k}": {json.dumps(v)}' for k, v in fields.items()) if fields else ""


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, chat_template: str | None = None,
                 prompt_tokens_details: bool = False, tool_parser: ToolCallParser | None = None,
                 reasoning_parser: str | None = None, tool_strict_level: ToolStrictLevel | None = None,
                 chat_template_content_format: str = "auto"):
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.chat_template_content_format = chat_template_content_format
        self.prompt_tokens_details = prompt_tokens_details
        self.tool_parser = tool_parser  # reads "auto" tool calls (--enable-auto-tool-choice --tool-call-parser)
        # vLLM's strict tool calling (tool_tags.py), None where it is off: the parser's format as a structural tag
        self.tool_strict_level = tool_strict_level
        self.tool_tag_model = tool_parser.tag_model if tool_parser and tool_strict_level is not None else None
        # reads the thinking of a reasoning model's chat answers (a tokenizer without its tags fails here)
        self.reasoning_parser = reasoning_parser_for(reasoning_parser, self.tokenizer)

    def _max_tokens(self, max_tokens: int | None) -> int | None:
        """Online, vLLM refuses a max_tokens past the model's length (offline it runs to the length)."""
        if max_tokens is not None and max_tokens > self.engine.max_model_len:
            raise ParameterError(f"max_tokens={max_tokens} cannot be greater than max_model_len="
                                 f"{self.engine.max_model_len}. Please request fewer output tokens.", "max_tokens",
                                 max_tokens)
        return max_tokens

    async def _compile_ahead(self, params: SamplingParams) -> None:
        """A structured-output constraint compiled off the event loop, with a time limit (see `compile_ahead`)."""
        if params.structured_outputs is not None:
            await self.engine.processor.structured.compile_ahead(params.structured_outputs)

    def _cached(self, outputs: list[RequestOutput]) -> int | None:
        """The prompt tokens of `outputs` the prefix cache served, where the usage reports them."""
        return sum(o.num_cached_tokens for o in outputs) if self.prompt_tokens_details else None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # prompts ----------------------------------------------------------------------------------------

    def _completion_prompts(self, req: CompletionRequest) -> list:
        if req.suffix is not None:
            raise APIError("suffix is not supported.", param="suffix")
        prompts: list = []
        if req.prompt_embeds is not None:
            for data in [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else req.prompt_embeds:
                prompts.append({"prompt_embeds": decode_prompt_embeds(data)})
        p = req.prompt
        if p is None or p == "" or p == []:
            if not prompts:
                raise APIError("Either prompt or prompt_embeds must be given.", param="prompt")
        elif isinstance(p, str):
            prompts.append(p)
        elif all(isinstance(x, int) for x in p):
            prompts.append(TokensPrompt(prompt_token_ids=list(p)))
        else:
            prompts.extend(x if isinstance(x, str) else TokensPrompt(prompt_token_ids=list(x)) for x in p)
        return prompts

    def _chat_prompt(self, req: ChatCompletionRequest | TokenizeRequest,
                     add_special_tokens: bool = False) -> TokensPrompt:
        if self.tokenizer is None:
            raise APIError("This model has no tokenizer to render chat messages with.")
        text = render_chat(self.tokenizer, req.messages, req.chat_template or self.chat_template,
                           add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message,
                           tools=getattr(req, "tools", None), chat_template_kwargs=req.chat_template_kwargs,
                           content_format=self.chat_template_content_format)
        # The template writes its own special tokens: the tokenizer adds none unless asked.
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return TokensPrompt(prompt_token_ids=ids, prompt=text)

    # completions ------------------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest,
                         lora: LoRARequest | None = None) -> dict | AsyncIterator[str]:
        """The response body, or (stream=True) an async iterator of chunks (JSON text). Bad input raises
        before any chunk, so the caller can still answer 400. `lora`: the adapter the request's model names."""
        _refuse_unsupported(req)
        usage = _stream_usage(req)
        model_name = lora.lora_name if lora else self.model_name
        if req.use_beam_search:
            return await self._completion_beam_search(req, lora, model_name)
        prompts = self._completion_prompts(req)
        if req.echo and req.logprobs is not None and req.prompt_embeds is None:
            req.prompt_logprobs = req.prompt_logprobs if req.prompt_logprobs is not None else req.logprobs
        params = req.to_sampling_params(self._max_tokens(req.max_tokens), req.logprobs, req.stream,
                                        self.engine.default_sampling_params, req.structured())
        request_id = f"cmpl-{uuid.uuid4().hex}"
        # Validate every prompt before any is queued (a request is queued when its stream is first read).
        tokenization = req.tokenization()
        processed = [self.engine.processor.process_prompt(req.salted(p), tokenization) for p in prompts]
        self.engine.processor.validate_params(params)
        await self._compile_ahead(params)
        prompt_index = {f"{request_id}-{i}": i for i in range(len(processed))}
        streams = [self.engine.generate(p, params, rid, req.priority, lora_request=lora)
                   for rid, p in zip(prompt_index, processed)]
        first, rest = await self._start(streams)
        meta = {"id": f"cmpl-{req.request_id}" if req.request_id else request_id, "created": int(time.time()),
                "model": model_name}
        if req.stream:
            return self._completion_stream(req, first, rest, prompt_index, meta, usage)
        finals: dict[int, RequestOutput] = {}
        async for out in _chain(first, rest):
            finals[prompt_index[out.request_id]] = out
        return self._completion_body(req, [finals[i] for i in range(len(streams))], meta)

    async def _start(self, streams: list[AsyncIterator[RequestOutput]]) -> tuple[RequestOutput,
                                                                                  AsyncIterator[RequestOutput]]:
        """The first output of the call's requests, and the stream of the rest: a request's own stream when
        there is one (each streamed chunk passes through no more generators than it must). Waiting for the
        first output surfaces an error from any request now, not mid-stream."""
        outputs = streams[0] if len(streams) == 1 else _merge(streams)
        try:
            return await outputs.__anext__(), outputs
        except BaseException:
            await outputs.aclose()
            raise

    def _completion_logprobs(self, tokens: list[int], entries: list[PositionLogprobs | None], k: int,
                             offset: int, as_ids: bool) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(tokens, entries):
            token = _token_str(entry or {}, token_id, self.tokenizer, as_ids)
            out["tokens"].append(token)
            out["text_offset"].append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(max(entry[token_id].logprob, _MIN_LOGPROB))
            # vLLM's (OpenAI's) k + 1: the entry's own token, then the top k (the same token once), by text
            out["top_logprobs"].append({_token_str(entry, t, self.tokenizer, as_ids): max(lp.logprob, _MIN_LOGPROB)
                                        for t, lp in list(entry.items())[:k + 1]})
        return out

    def _completion_choice(self, req: CompletionRequest, out: RequestOutput, c: CompletionOutput) -> dict:
        text, logprobs = c.text, None
        if req.echo and out.prompt is not None:
            text = out.prompt + text
        if req.logprobs is not None:
            tokens, entries = list(c.token_ids), list(c.logprobs or [])
            if req.echo and out.prompt_logprobs is not None:
                tokens, entries = list(out.prompt_token_ids) + tokens, list(out.prompt_logprobs) + entries
            logprobs = self._completion_logprobs(tokens, entries, req.logprobs, 0, req.return_tokens_as_token_ids)
        choice = {"text": text, "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if out.prompt_logprobs is not None:  # vLLM's field: each prompt position's entries by token id
            choice["prompt_logprobs"] = [None if e is None else {
                str(t): {"logprob": max(lp.logprob, _MIN_LOGPROB), "rank": lp.rank, "decoded_token": lp.decoded_token}
                for t, lp in e.items()} for e in out.prompt_logprobs]
        if req.return_token_ids:
            choice.update(prompt_token_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids))
        return choice

    def _completion_body(self, req: CompletionRequest, outputs: list[RequestOutput], meta: dict) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                choices.append({"index": i * req.n + c.index, **self._completion_choice(req, out, c)})
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens, self._cached(outputs))}

    async def _completion_stream(self, req: CompletionRequest, out: RequestOutput | None,
                                 rest: AsyncIterator[RequestOutput], prompt_index: dict[str, int], meta: dict,
                                 usage: tuple[bool, bool]) -> AsyncIterator[str]:
        final_usage, continuous_usage = usage
        encoder = _ChunkEncoder(meta, "text_completion")
        cursor = _StreamCursor()
        prompt_tokens: dict[int, int] = {}
        last: dict[int, RequestOutput] = {}   # each prompt's latest output, for the final usage
        try:
            while out is not None:
                i = prompt_index[out.request_id]
                prompt_tokens[i], last[i] = len(out.prompt_token_ids), out
                for c in out.outputs:
                    index = i * req.n + c.index
                    d = cursor.advance(index, c)
                    if d is None:
                        continue
                    text = out.prompt + d.text if d.first and req.echo and out.prompt is not None else d.text
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self._completion_logprobs(d.token_ids, d.logprobs, req.logprobs, d.text_offset,
                                                             req.return_tokens_as_token_ids)
                    extra = None
                    if req.return_token_ids:  # the prompt's ids with the choice's first chunk, then new ids
                        extra = {"prompt_token_ids": list(out.prompt_token_ids)} if d.first else {}
                        extra["token_ids"] = d.token_ids
                    # with continuous usage: this choice's prompt and its tokens so far, as vLLM counts them
                    yield encoder.choice(index, "text", _json_str(text), logprobs, c.finish_reason, c.stop_reason,
                                         _usage(prompt_tokens[i], cursor.sent[index][1]) if continuous_usage else None,
                                         extra)
                out = await anext(rest, None)
        finally:  # the consumer went away or a request failed: the requests still running are aborted
            await rest.aclose()
        if final_usage:
            yield encoder.usage(_usage(sum(prompt_tokens.values()), cursor.completion_tokens,
                                       self._cached(list(last.values()))))

    async def _completion_beam_search(self, req: CompletionRequest, lora: LoRARequest | None,
                                      model_name: str) -> dict:
        tokenization = req.tokenization()
        prompts = [self.engine.processor.process_prompt(p, tokenization) for p in self._completion_prompts(req)]
        if any(p.embeds is not None for p in prompts):
            raise APIError("use_beam_search takes text or token prompts, not prompt embeddings.")
        results = await self._beam_search(req, [p.token_ids for p in prompts], req.max_tokens, lora)
        choices = [{"index": i * req.n + c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for i, beams in enumerate(results) for c in beams]
        return {"id": f"cmpl-{req.request_id or uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": _usage(sum(len(p.token_ids) for p in prompts),
                                sum(len(c.token_ids) for beams in results for c in beams))}

    async def _beam_search(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]],
                           max_tokens: int | None, lora: LoRARequest | None) -> list[list[CompletionOutput]]:
        """The request's n best beams for each prompt (vLLM's use_beam_search), through `lora`'s adapter. As
        vLLM's server answers them: a beam that ended in EOS without it (unless include_stop_str_in_output),
        the EOS its stop_reason."""
        if req.stream:
            raise APIError("use_beam_search does not stream.", param="stream")
        if req.structured() is not None:
            raise APIError("use_beam_search cannot follow structured outputs.", param="structured_outputs")
        self.engine.processor.validate_beam_width(req.n)
        self.engine.processor.check_priority(req.priority)
        temperature = self.engine.default_sampling_params.get("temperature", 0.0)
        params = BeamSearchParams(beam_width=req.n, max_tokens=self._max_tokens(max_tokens) or 16,
                                  ignore_eos=req.ignore_eos,
                                  temperature=temperature if req.temperature is None else req.temperature,
                                  length_penalty=req.length_penalty)
        stepper = AsyncEngineBeamStepper(self.engine, asyncio.get_running_loop(), req.priority, req.cache_salt)

        def search():  # on a thread: its steps wait for the engine's outputs, which arrive on this loop
            try:
                return run_beam_search(stepper, prompts, params, self.tokenizer, self.engine.max_model_len,
                                       lora_requests=[lora] * len(prompts))
            finally:
                stepper.close()  # here, not in the caller: the search may outlive a caller that went away
        outputs = []
        for prompt, result in zip(prompts, await asyncio.to_thread(search)):
            beams = []
            for j, seq in enumerate(result.sequences):
                new, eos = seq.tokens[len(prompt):], seq.finish_reason == "stop"
                if eos and not req.include_stop_str_in_output:
                    new = new[:-1]
                text = self.tokenizer.decode(new, skip_special_tokens=req.skip_special_tokens) if self.tokenizer \
                    else ""
                beams.append(CompletionOutput(j, text, new, seq.cum_logprob, None, seq.finish_reason or "length",
                                              seq.tokens[-1] if eos else None))
            outputs.append(beams)
        return outputs

    # chat -------------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, lora: LoRARequest | None = None) -> dict | AsyncIterator[str]:
        _refuse_unsupported(req)
        if req.tool_choice == "auto" and self.tool_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set.',
                           param="tool_choice")
        parser_reads_forced = self.tool_tag_model is not None
        if req.tool_choice == "auto" or (parser_reads_forced and req.tool_choice not in (None, "none")):
            req.skip_special_tokens = False  # a model's tool-call tags may be special tokens (vLLM's hermes rule)
        # per request: whether the model thinks can depend on its chat-template arguments (Qwen3's enable_thinking)
        reasoning = self.reasoning_parser and self.reasoning_parser.for_chat(req.chat_template_kwargs)
        answers = ChatAnswers(req.tool_choice, self.tool_parser, reasoning, req.include_reasoning, parser_reads_forced)
        usage = _stream_usage(req)
        prompt = self.engine.processor.process_prompt(req.salted(self._chat_prompt(req, req.add_special_tokens)),
                                                      req.tokenization())
        # As vLLM: without its thinking returned, a structured answer is held to its grammar from the start.
        reasoning_ended = None if reasoning is None else \
            (not req.include_reasoning or reasoning.is_reasoning_end(prompt.token_ids))
        top = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.to_sampling_params(self._max_tokens(max_tokens), top if req.logprobs else None, req.stream,
                                        self.engine.default_sampling_params,
                                        req.structured(self.tool_tag_model, self.tool_strict_level))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        model_name = lora.lora_name if lora else self.model_name
        if req.use_beam_search:
            return await self._chat_beam_search(req, answers, prompt.token_ids, max_tokens, lora, model_name)
        await self._compile_ahead(params)
        first, rest = await self._start([self.engine.generate(prompt, params, request_id, req.priority,
                                                              reasoning_ended, lora)])
        meta = {"id": f"chatcmpl-{req.request_id}" if req.request_id else request_id, "created": int(time.time()),
                "model": model_name}
        if req.stream:
            return self._chat_stream(req, answers, first, rest, meta, prompt.token_ids, usage)
        async for final in _chain(first, rest):
            pass
        as_ids = req.return_tokens_as_token_ids
        with_logprobs = req.logprobs and not answers.hides_thinking
        choices = []
        for c in final.outputs:
            message, called = answers.message(c.text)
            choices.append({
                "index": c.index, "message": message,
                "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, req.shown_top_logprobs(), as_ids)
                if with_logprobs else None,
                "finish_reason": answers.finish_reason(c.finish_reason, called), "stop_reason": c.stop_reason,
                **({"token_ids": list(c.token_ids)} if req.return_token_ids else {})})
        body = {**meta, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs),
                                self._cached([final]), answers.reasoning_tokens(final.outputs))}
        if req.return_token_ids:
            body["prompt_token_ids"] = list(final.prompt_token_ids)
        return body

    async def _chat_beam_search(self, req: ChatCompletionRequest, answers: ChatAnswers, prompt: list[int],
                                max_tokens: int | None, lora: LoRARequest | None, model_name: str) -> dict:
        """The n best beams as choices, each answer read as any other (its thinking, its tool calls)."""
        (outputs,) = await self._beam_search(req, [prompt], max_tokens, lora)
        choices = []
        for c in outputs:
            message, called = answers.message(c.text)
            choices.append({"index": c.index, "message": message, "logprobs": None,
                            "finish_reason": answers.finish_reason(c.finish_reason, called),
                            "stop_reason": c.stop_reason})
        return {"id": f"chatcmpl-{req.request_id or uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": _usage(len(prompt), sum(len(c.token_ids) for c in outputs), None,
                                answers.reasoning_tokens(outputs))}

    def _chat_logprobs(self, tokens: list[int], entries: list[PositionLogprobs] | None, k: int,
                       as_ids: bool) -> dict:
        content = []
        for token_id, entry in zip(tokens, entries or []):
            def item(t: int) -> dict:
                s = _token_str(entry, t, self.tokenizer, as_ids)
                return {"token": s, "logprob": max(entry[t].logprob, _MIN_LOGPROB), "bytes": list(s.encode("utf-8"))}
            # as vLLM: the first k of the entry (its own token, then the top ones)
            content.append({**item(token_id), "top_logprobs": [item(t) for t in list(entry)[:k]]})
        return {"content": content}

    async def _chat_stream(self, req: ChatCompletionRequest, answers: ChatAnswers, out: RequestOutput | None,
                           rest: AsyncIterator[RequestOutput], meta: dict, prompt_token_ids: list[int],
                           usage: tuple[bool, bool]) -> AsyncIterator[str]:
        final_usage, continuous_usage = usage
        encoder = _ChunkEncoder(meta, "chat.completion.chunk")
        cursor = _StreamCursor(keep=not answers.plain)   # tool calls and thinking are read from the whole answer
        top, prompt_tokens, ids = req.shown_top_logprobs(), len(prompt_token_ids), req.return_token_ids
        with_logprobs = req.logprobs and not answers.hides_thinking
        last = out
        try:
            for i in range(req.n):  # the first chunk ever has the prompt's token ids (return_token_ids)
                yield encoder.choice(i, "delta", '{"role": "assistant", "content": ""}', None, None, None,
                                     _usage(prompt_tokens, 0, None, answers.reasoning_tokens([]))
                                     if continuous_usage else None,
                                     top={"prompt_token_ids": list(prompt_token_ids)} if ids and i == 0 else None)
            while out is not None:
                for c in out.outputs:
                    d = cursor.advance(c.index, c)
                    if d is None:
                        continue
                    logprobs = self._chat_logprobs(d.token_ids, d.logprobs, top, req.return_tokens_as_token_ids) \
                        if with_logprobs else None
                    finish_reason = c.finish_reason
                    if answers.plain:
                        delta = '{"content": %s}' % _json_str(d.text) if d.text else "{}"
                    else:
                        whole = cursor.whole[c.index]
                        fields, called = answers.delta(c.index, whole.text, d.text, d.first, finish_reason is not None)
                        delta, finish_reason = json.dumps(fields), answers.finish_reason(finish_reason, called, True)
                    # continuous usage: this choice's tokens so far, and of them its thinking (vLLM's counts)
                    yield encoder.choice(c.index, "delta", delta, logprobs, finish_reason, c.stop_reason,
                                         _usage(prompt_tokens, cursor.sent[c.index][1], None,
                                                answers.reasoning_tokens([cursor.whole[c.index]])
                                                if answers.reasoning else None) if continuous_usage else None,
                                         {"token_ids": d.token_ids} if ids else None)
                last, out = out, await anext(rest, None)
        finally:  # the consumer went away or the request failed: a request still running is aborted
            await rest.aclose()
        if final_usage:
            yield encoder.usage(_usage(prompt_tokens, cursor.completion_tokens, self._cached([last]),
                                       answers.reasoning_tokens(list((cursor.whole or {}).values()))))

    # responses ------------------------------------------------------------------------------------------

    async def responses(self, req: ResponsesRequest, lora: LoRARequest | None = None) -> dict | AsyncIterator[str]:
        """OpenAI's Responses API, made of a chat answer (`responses.py`)."""
        return await create_response(self, req, lora)

    # tokens -----------------------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> dict:
        if self.tokenizer is None:
            raise APIError("This model has no tokenizer.")
        if req.messages is not None:
            tokens = self._chat_prompt(req)["prompt_token_ids"]
        elif req.prompt is not None:
            tokens = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError("Either prompt or messages must be given.", param="prompt")
        return {"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        if self.tokenizer is None:
            raise APIError("This model has no tokenizer.")
        self.engine.processor.validate_token_ids(req.tokens)
        return {"prompt": self.tokenizer.decode(req.tokens)}
