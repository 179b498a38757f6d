"""`SamplingParams`: how one request chooses its tokens and when it stops (vLLM's fields and defaults)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


class ParameterError(ValueError):
    """A request parameter's bad value, named as vLLM's validation errors name it: in the message's last words,
    and as the `param` of the server's error."""

    def __init__(self, message: str, parameter: str, value=None):
        named = f"parameter={parameter}" + ("" if value is None else f", value={value}")   # (vLLM: None unsaid)
        super().__init__(f"{message} ({named})")
        self.parameter, self.value = parameter, value


class RequestOutputKind(enum.Enum):
    """When and what the engine reports of a request: every step with everything so far (CUMULATIVE), every
    step with only what is new since its last output (DELTA: the new tokens, text and logprobs of each
    completion that progressed; prompt logprobs in the first output), or once at the end (FINAL_ONLY, what
    the offline API uses: no per-step output to build)."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's constraints on what a request may generate, one kind at a time: `json` (a JSON schema, as a dict
    or its text), `json_object` (any JSON object), `regex`, `grammar` (EBNF rules `root ::= ...`, or Lark's),
    `choice` (exactly one of the strings), `structural_tag` (free text where tagged sections follow schemas).
    Compiled by xgrammar when the request is processed (`engine/structured_output.py`)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False   # JSON without whitespace between items
    whitespace_pattern: str | None = None  # another backend's option: refused

    def __post_init__(self) -> None:
        given = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("Give one kind of structured output (json, regex, choice, grammar, json_object or "
                             f"structural_tag), got {', '.join(given) or 'none'}.")
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported (the xgrammar backend's JSON "
                             "takes disable_any_whitespace).")
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "json":
            ok, expected = isinstance(value, (str, dict)), "a JSON schema (an object or its text)"
        elif kind == "json_object":
            ok, expected = value is True, "true"
        elif kind == "choice":
            ok = isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)
            expected = "a non-empty list of non-empty strings"
        else:
            ok, expected = isinstance(value, str) and value, "a non-empty string"
        if not ok:
            raise ValueError(f"structured_outputs.{kind} must be {expected}.")

    @property
    def kind(self) -> str:
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))


@dataclass(frozen=True)
class RepetitionDetectionParams:
    """vLLM's: end a generation (finish_reason "repetition") whose last output tokens are one pattern of
    `min_pattern_size` (0: 1) to `max_pattern_size` tokens repeated `min_count` times in a row: a model looping
    on a phrase stops instead of running to max_tokens. max_pattern_size 0: off."""
    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_pattern_size <= self.max_pattern_size:
            raise ParameterError("max_pattern_size, min_pattern_size must be >=0, with min_pattern_size <= "
                                 "max_pattern_size. Set both to 0 to disable repetitive pattern detection.",
                                 "repetition_detection")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ParameterError("min_count must be >= 2 to detect repetitive patterns in engine output. If you do "
                                 "not wish to detect repetitive patterns, set max_pattern_size to 0.",
                                 "repetition_detection")

    def repeats(self, tokens: list[int]) -> bool:
        """Whether `tokens` ends with a pattern of an allowed size repeated min_count times."""
        for size in range(max(self.min_pattern_size, 1), self.max_pattern_size + 1):
            if size * self.min_count > len(tokens):
                return False
            tail = tokens[-size:]
            if all(tokens[-size * (k + 1):len(tokens) - size * k] == tail for k in range(1, self.min_count)):
                return True
        return False


MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's cap on logprob_token_ids


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None   # only these may be sampled
    bad_words: list[str] | None = None           # never generated (vLLM's rule: see the model runner)
    structured_outputs: StructuredOutputsParams | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # A streamed request's outputs carry this many new tokens at a time (the first and the last come at once);
    # the engine's `stream_interval` is the floor. None: the engine's.
    stream_interval: int | None = None
    # vLLM's: the logprobs of exactly these tokens (and the sampled one) at each step, in place of the top ones
    # (`logprobs` then is their number): scoring labels ("yes" / "no") without the whole vocabulary
    logprob_token_ids: list[int] | None = None
    repetition_detection: RepetitionDetectionParams | None = None
    # vLLM's: anything a caller's own code wants to carry with the request (online: the request's vllm_xargs)
    extra_args: dict | None = None
    # vLLM's: True computes the whole prompt even where the prefix cache holds it (its KV still goes into the
    # cache); None: so where prompt logprobs are asked for (they need every prompt position computed)
    skip_reading_prefix_cache: bool | None = None
    # vLLM's: a reasoning model (reasoning_parser) may think this many tokens; then the end of thinking is forced.
    # -1 or None: no limit.
    thinking_token_budget: int | None = None
    # Filled in by the processor: the model's EOS ids, which `ignore_eos` and `min_tokens` act on, and each bad
    # word's token ids (as it starts the text, and after a space).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    # with a thinking_token_budget: the reasoning parser's (start, end) tag ids
    thinking_tags: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.repetition_detection, dict):
            self.repetition_detection = RepetitionDetectionParams(**self.repetition_detection)
        if self.repetition_detection is not None and not self.repetition_detection.max_pattern_size:
            self.repetition_detection = None  # off
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = [int(t) for t in self.logprob_token_ids]
        if self.thinking_token_budget == -1:
            self.thinking_token_budget = None  # unlimited
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, value, limit: str) -> ValueError:
            return ParameterError(f"{name} must be {limit}, got {value!r}.", name, value)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "at least 1")
        if self.n > 1 and self.greedy:  # vLLM's rule: n greedy completions would all be the same
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.temperature < 0.0:
            raise bad("temperature", self.temperature, "non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "-1 (disable), or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", self.repetition_penalty, "greater than 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise bad(name, value, "-1 (the whole vocabulary) or non-negative")
        if self.stream_interval is not None and (not isinstance(self.stream_interval, int)
                                                 or self.stream_interval < 1):
            raise bad("stream_interval", self.stream_interval, "at least 1")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("allowed_token_ids must not be empty (None allows every token).")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.logprob_token_ids is not None:
            n = len(self.logprob_token_ids)
            if n > MAX_LOGPROB_TOKEN_IDS:
                raise ParameterError(f"Requested logprob_token_ids of length {n}, which is greater than max "
                                     f"allowed: {MAX_LOGPROB_TOKEN_IDS}", "logprob_token_ids", n)
            if self.logprobs is not None and self.logprobs != n:
                raise ParameterError(f"When both logprobs and logprob_token_ids are set, logprobs must equal "
                                     f"len(logprob_token_ids). Got logprobs={self.logprobs}, "
                                     f"len(logprob_token_ids)={n}.", "logprob_token_ids")
        budget = self.thinking_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ParameterError("`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
                                 "thinking_token_budget", budget)
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise bad("extra_args", self.extra_args, "a dict")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone(self, **changes) -> "SamplingParams":
        params = SamplingParams.__new__(SamplingParams)
        params.__dict__.update(self.__dict__)
        params.__dict__.update(changes)
        params.stop = list(self.stop)
        params.stop_token_ids = list(self.stop_token_ids)
        params.all_stop_token_ids = set(self.all_stop_token_ids)
        params.bad_words_token_ids = [list(ids) for ids in self.bad_words_token_ids]
        return params
