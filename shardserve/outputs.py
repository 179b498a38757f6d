"""What the engine hands back: vLLM's `RequestOutput` / `CompletionOutput` / `Logprob` for generation, and
`PoolingRequestOutput` with its typed forms (embedding, classification, score) for pooling models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

_O = TypeVar("_O")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per position: token id -> its Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, later: CompletionOutput) -> None:
        """Append a later DELTA output of this completion (its new text, tokens and logprobs) in place: this
        output's lists are its own (a DELTA output's are fresh slices), so a stream folded step by step costs
        what is new, not a copy of everything so far."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        self.cumulative_logprob, self.finish_reason, self.stop_reason = \
            later.cumulative_logprob, later.finish_reason, later.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)

    def add(self, later: RequestOutput) -> None:
        """Fold a later DELTA output of the same request into this one (a consumer that fell behind gets one
        output with everything it missed): each completion's new text, tokens and logprobs appended."""
        self.finished = later.finished
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        by_index = {c.index: c for c in self.outputs}
        for new in later.outputs:
            if new.index in by_index:
                by_index[new.index].add(new)
            else:
                self.outputs.append(new)


# Pooling models ------------------------------------------------------------------------------------------

@dataclass
class PoolingOutput:
    data: torch.Tensor  # what the pooler returned: a vector, class probabilities, or one row per token


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput(Generic[_O]):
    """vLLM's shape: what `LLM.encode` returns (outputs: PoolingOutput) and, typed, what `embed`,
    `classify` and `score` return."""
    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @classmethod
    def from_base(cls, output: PoolingRequestOutput[PoolingOutput]) -> EmbeddingRequestOutput:
        return cls(output.request_id, EmbeddingOutput(output.outputs.data.tolist()), output.prompt_token_ids,
                   output.finished, output.num_cached_tokens)


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @classmethod
    def from_base(cls, output: PoolingRequestOutput[PoolingOutput]) -> ClassificationRequestOutput:
        return cls(output.request_id, ClassificationOutput(output.outputs.data.tolist()),
                   output.prompt_token_ids, output.finished, output.num_cached_tokens)


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @classmethod
    def from_base(cls, output: PoolingRequestOutput[PoolingOutput]) -> ScoringRequestOutput:
        data = output.outputs.data
        if data.numel() != 1:
            raise ValueError(f"A score is one number; the model returned {data.numel()} (a classifier with "
                             f"more than one label cannot score pairs).")
        return cls(output.request_id, ScoringOutput(data.item()), output.prompt_token_ids, output.finished,
                   output.num_cached_tokens)
