"""`PoolingParams`: what one request to a pooling model asks for (vLLM's fields and defaults).

The task says what the output is; the processor fills the task's defaults from the model's pooler config
and checks the rest against the model before anything is queued.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from typing import Literal

# embed: one vector per prompt; classify: class probabilities per prompt; score: one number per (pair) prompt;
# token_embed / token_classify: the same per prompt token.
PoolingTask = Literal["embed", "classify", "score", "token_embed", "token_classify"]
POOLING_TASKS: tuple[str, ...] = ("embed", "classify", "score", "token_embed", "token_classify")

# Which parameters each task reads; any other one set is refused rather than silently ignored.
TASK_PARAMETERS = {
    "embed": ("dimensions", "use_activation"),
    "token_embed": ("dimensions", "use_activation"),
    "classify": ("use_activation",),
    "score": ("use_activation",),
    "token_classify": ("use_activation", "step_tag_id", "returned_token_ids"),
}


@dataclass
class PoolingParams:
    # Keep only this many prompt tokens, cut on the tokenizer's truncation side (the end, unless the tokenizer
    # says otherwise); -1 = the model's maximum length; None = a prompt over the limit is an error.
    truncate_prompt_tokens: int | None = None
    # Which end truncation cuts: "right" keeps the first tokens, "left" the last; None = the tokenizer's side.
    # Special tokens ([CLS], [SEP], BOS) stay either way.
    truncation_side: Literal["left", "right"] | None = None
    # Embeddings: keep the first `dimensions` features (Matryoshka models only).
    dimensions: int | None = None
    # Embeddings: L2-normalise; classification and scores: softmax / sigmoid. None = the model's default.
    use_activation: bool | None = None
    # STEP pooling (process reward models): the token marking a step, and which outputs to return there.
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    # Set by the API that sends the request (LLM.embed sets "embed", ...).
    task: PoolingTask | None = None
    # Names vLLM removed; refused with a pointer to `use_activation` instead of being silently dropped.
    normalize: InitVar[bool | None] = None
    softmax: InitVar[bool | None] = None
    activation: InitVar[bool | None] = None

    def __post_init__(self, normalize, softmax, activation) -> None:
        for name, value in (("normalize", normalize), ("softmax", softmax), ("activation", activation)):
            if value is not None:
                raise ValueError(f"PoolingParams({name}=...) has been removed; use use_activation instead "
                                 f"(it normalises embeddings and applies softmax/sigmoid to classifications).")
        if self.truncate_prompt_tokens is not None and (
                not isinstance(self.truncate_prompt_tokens, int) or self.truncate_prompt_tokens < -1
                or self.truncate_prompt_tokens == 0):
            raise ValueError(f"truncate_prompt_tokens must be -1 (the model's maximum length) or a positive "
                             f"number of tokens, got {self.truncate_prompt_tokens!r}.")
        if self.truncation_side not in (None, "left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}.")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"Dimensions must be greater than 0, got {self.dimensions!r}.")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"Unknown pooling task {self.task!r}; choose one of {', '.join(POOLING_TASKS)}.")

    def clone(self, **changes) -> PoolingParams:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)
