"""Request bodies of the OpenAI-compatible routes, as OpenAI and vLLM document them.

Unknown fields are ignored (clients send fields we do not use, like `user`). Each request turns into the
engine's `SamplingParams`; range checks stay in `SamplingParams` and the processor, so the offline and
online APIs refuse the same things with the same words.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shardserve.engine.processor import TokenizationParams
from shardserve.router.tool_calls import checked_functions, tool_choice_schema
from shardserve.router.tool_tags import ToolStrictLevel, tool_call_tag
from shardserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# vLLM's neutral value of each sampling field: SamplingParams' own default.
_NEUTRAL = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


class SamplingRequest(OpenAIBase):
    """Fields the completion and chat requests share, with vLLM's extra sampling fields."""
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    stream_interval: int | None = None   # raises the server's --stream-interval for this (streamed) request
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0   # lower is served first, with --scheduling-policy priority (else only 0 is taken)
    logprob_token_ids: list[int] | None = None   # the logprobs of these tokens, in place of the top ones
    repetition_detection: dict[str, int] | None = None   # stop a loop of repeated tokens (RepetitionDetectionParams)
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None   # SamplingParams.extra_args
    thinking_token_budget: int | None = None   # a reasoning model's thinking, at most this many tokens (-1: no limit)
    # vLLM's prompt and response extras
    add_special_tokens: bool = True        # a text prompt gets the tokenizer's special tokens (chat: False)
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)  # prefix cache shared only within a salt
    return_token_ids: bool = False         # the prompt's and the completion's token ids in the response
    return_tokens_as_token_ids: bool = False   # logprob tokens as "token_id:<id>"
    request_id: str | None = None          # the response's id (after "cmpl-" / "chatcmpl-"); default: random
    # Structured outputs: vLLM's `structured_outputs` (json, regex, choice, grammar, json_object,
    # structural_tag), OpenAI's `response_format` (json_object, json_schema, and vLLM's structural_tag), and
    # the older guided_* fields vLLM took before them.
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logits_processors: list[Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set that would change the output in a way this server cannot honour."""
        return "logits_processors" if self.logits_processors else None

    @model_validator(mode="after")
    def _logprob_token_ids_need_logprobs(self):
        """vLLM's rules: logprob_token_ids ask for logprobs (which then list exactly those tokens), not with beam
        search."""
        if self.logprob_token_ids:
            if self.use_beam_search:
                raise ValueError("`logprob_token_ids` is not supported with beam search.")
            if self.logprobs is None or self.logprobs is False:
                raise ValueError("when using `logprob_token_ids`, `logprobs` must be set.")
            # each position then lists those tokens: as many as a request for that many top logprobs
            if self.logprobs is True:  # chat
                self.top_logprobs = len(self.logprob_token_ids)
            else:
                self.logprobs = len(self.logprob_token_ids)
        return self

    def structured(self) -> StructuredOutputsParams | None:
        return _structured_outputs(self.structured_fields())

    def structured_fields(self) -> dict[str, Any]:
        """The request's structured-outputs fields: `response_format` takes the place of what `structured_outputs`
        gives of the same kind (vLLM's rule); a guided_* field is its structured_outputs key."""
        fields = dict(self.structured_outputs or {})
        for kind in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{kind}") is not None:
                fields[kind] = getattr(self, f"guided_{kind}")
        fields.update(_response_format_fields(self.response_format))
        return fields

    def tokenization(self) -> TokenizationParams:
        return TokenizationParams(self.add_special_tokens, self.truncate_prompt_tokens, self.truncation_side)

    def salted(self, prompt):
        """`prompt` with the request's cache_salt."""
        if self.cache_salt is None:
            return prompt
        return {"prompt": prompt, "cache_salt": self.cache_salt} if isinstance(prompt, str) else \
            {**prompt, "cache_salt": self.cache_salt}

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None, stream: bool,
                           defaults: dict[str, Any], structured: StructuredOutputsParams | None) -> SamplingParams:
        """`defaults`: the engine's sampling defaults (the model's generation config), for the fields the
        request leaves out; then vLLM's neutral values. `structured`: the request's `structured()`."""
        def given(name):
            value = getattr(self, name)
            return defaults.get(name, _NEUTRAL[name]) if value is None else value
        return SamplingParams(
            n=self.n, temperature=given("temperature"), top_p=given("top_p"), top_k=given("top_k"),
            min_p=given("min_p"), seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            presence_penalty=given("presence_penalty"), frequency_penalty=given("frequency_penalty"),
            repetition_penalty=given("repetition_penalty"), ignore_eos=self.ignore_eos,
            max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
            min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            stream_interval=self.stream_interval, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, logprob_token_ids=self.logprob_token_ids or None,
            repetition_detection=self.repetition_detection, extra_args=self.vllm_xargs or None,
            thinking_token_budget=self.thinking_token_budget,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


def _structured_outputs(fields: dict[str, Any]) -> StructuredOutputsParams | None:
    if not fields:
        return None
    try:
        return StructuredOutputsParams(**fields)
    except TypeError:  # a key StructuredOutputsParams does not have
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(StructuredOutputsParams)})
        raise ValueError(f"Unknown structured_outputs field(s): {', '.join(unknown)}.") from None


def _response_format_fields(response_format: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's `response_format` as structured-outputs fields: `text` is no constraint."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema, a JSON schema object.")
        return {"json": schema}
    if kind == "structural_tag":
        return {"structural_tag": json.dumps(response_format)}
    raise ValueError(f"response_format type must be text, json_object, json_schema or structural_tag, got {kind!r}.")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    prompt_embeds: str | list[str] | None = None   # base64 of torch.save'd tensors
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_max_tokens_is_the_default(cls, value):
        return 16 if value is None else value  # vLLM's rule for completions (chat's null: to the model's length)
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:  # picking the best of more samples
            return "best_of"
        return super().unsupported()


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None   # false: one call at most
    # vLLM's extras
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    add_special_tokens: bool = False   # the chat template writes its own
    # Reasoning models (--reasoning-parser): whether the answer carries the thinking; OpenAI's effort, which (as
    # vLLM) also turns thinking on or off in templates that read `enable_thinking` ("none": off).
    include_reasoning: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    def shown_top_logprobs(self) -> int:
        """How many of a position's logprob entries the answer lists: top_logprobs, or with logprob_token_ids all
        of them (the sampled token and the given ones, as vLLM)."""
        return (self.top_logprobs or 0) + (1 if self.logprob_token_ids else 0)

    @model_validator(mode="after")
    def _tools_default_to_auto(self):
        """OpenAI's default, as vLLM: tools without a tool_choice leave the choice to the model."""
        if self.tools and "tool_choice" not in self.model_fields_set:
            self.tool_choice = "auto"
        return self

    @model_validator(mode="after")
    def _effort_to_template(self):
        """The chat template sees reasoning_effort, and enable_thinking where the request does not set it."""
        if self.reasoning_effort is not None:
            kwargs = {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
            self.chat_template_kwargs = kwargs
        return self

    def structured(self, tool_tag_model: str | None = None,
                   tool_strict_level: ToolStrictLevel = ToolStrictLevel.AUTO) -> StructuredOutputsParams | None:
        """The answer's constraint: a forced tool choice ("required", a named function) holds it to calls of the
        given tools, in the model's own format where the server's tool-call parser names one (`tool_tag_model`:
        vLLM's strict tool calling, `tool_tags.py`), else as JSON (`tool_calls.tool_choice_schema`); "auto" is
        held to the model's format where the strict level asks for it. Otherwise the request's structured
        outputs. A forced call takes structured_outputs' options (disable_any_whitespace), not another
        constraint."""
        fields = self.structured_fields()
        functions = checked_functions(self.tool_choice, self.tools)
        if functions is None:
            return _structured_outputs(fields)
        forced = self.tool_choice != "auto"
        if forced and set(fields) - {"disable_any_whitespace"}:
            raise ValueError("tool_choice 'required' or a named function constrains the answer itself: it "
                             "cannot be combined with structured outputs or response_format.")
        if tool_tag_model is not None:
            tag = tool_call_tag(tool_tag_model, self.tools, self.tool_choice, self.parallel_tool_calls,
                                tool_strict_level, None if forced else _structured_outputs(fields))
            return StructuredOutputsParams(structural_tag=tag) if tag is not None else _structured_outputs(fields)
        schema = tool_choice_schema(self.tool_choice, functions, self.parallel_tool_calls)
        if schema is not None:
            fields["json"] = schema
        return _structured_outputs(fields)


class TokenizeRequest(OpenAIBase):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


class LoadLoRAAdapterRequest(OpenAIBase):
    """vLLM's /v1/load_lora_adapter; `base_model_name` (ours) names the adapter's model in an app of several."""
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    base_model_name: str | None = None


class UnloadLoRAAdapterRequest(OpenAIBase):
    lora_name: str
    lora_int_id: int | None = None
