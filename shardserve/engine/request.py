"""The state of one sequence as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from shardserve.lora.request import LoRARequest
from shardserve.outputs import PositionLogprobs
from shardserve.pooling_params import PoolingParams
from shardserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_REPETITION = "repetition"  # vLLM's: SamplingParams.repetition_detection saw a loop

    def __init__(self, value: str):
        # a plain attribute of each member: read for every request several times a step
        self.finished = value in ("stop", "length", "abort", "repetition")


@dataclass(eq=False)  # a request is itself: queue membership tests compare identities, not fields
class Request:
    """One sequence: a prompt, the tokens generated so far, and how far its KV cache is computed.

    `num_computed_tokens` is the single progress counter: prefill, chunked prefill, prefix-cache hits and
    recompute after preemption all move it, and the scheduler only ever asks "how many tokens are left".

    A request has sampling params (generation) or pooling params (a prefill-only request to a pooling
    model, finished by the step that computes its prompt), never both.
    """
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    prompt: str | None = None
    # Prompt embeddings in place of the prompt's tokens (whose ids are then placeholders).
    prompt_embeds: torch.Tensor | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0   # under the priority policy: lower runs first (the scheduler's order)
    cache_salt: str | None = None   # starts the hash chain of its KV blocks: shared only with the same salt
    # Which completion of its parent this is (n > 1 fans a prompt out into n requests).
    index: int = 0
    parent_id: str | None = None
    pooling_params: PoolingParams | None = None
    token_type_ids: list[int] | None = None     # segment of each prompt token (sentence pairs for BERT)
    pooled: torch.Tensor | None = None          # a pooling request's output, once computed
    # Keep the KV blocks when it finishes (until the engine releases it), for beams to fork from.
    hold_kv: bool = False
    # Structured outputs: the grammar's state after the output so far (an xgrammar matcher), or None.
    grammar: Any = None
    # A reasoning model's grammar starts once its thinking has ended (engine/reasoning.py).
    reasoning_ended: bool = True
    lora_request: LoRARequest | None = None     # the adapter it runs through (enable_lora)
    # Its steps cannot overlap the engine's reading of the step before (async scheduling): set by the engine.
    steps_alone: bool = False
    # Speculative decoding (engine/speculative.py): whether it may take draft tokens, and its tokens as the
    # n-gram lookup scans them
    can_draft: bool = False
    token_index: Any = None

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens a launched step samples that the engine has not read yet (async scheduling: the step after it is
    # scheduled first, its input read on the device); at most one outside a step.
    num_output_placeholders: int = 0
    num_cached_tokens: int = 0          # prompt tokens served by the prefix cache on first schedule
    # A generation's length when it ends, if nothing stops it sooner: prompt + max_tokens, at most max_model_len
    # (set by the scheduler when it takes the request)
    max_len: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def __post_init__(self) -> None:
        if (self.sampling_params is None) == (self.pooling_params is None):
            raise ValueError("A request needs either sampling params or pooling params.")
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params is None:
            return
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context to be predicted from

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
