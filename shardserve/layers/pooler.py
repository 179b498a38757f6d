"""Poolers: a step's packed hidden states [num_tokens, hidden] -> one output tensor per request.

Pooling picks rows: CLS (a prompt's first token), LAST, MEAN (the average of its tokens) give one vector
per prompt; ALL keeps every token's row; STEP keeps the rows at a step-tag token. A head then makes the
task's output: embeddings are projected (Sentence Transformers Dense layers), cut to `dimensions` and
L2-normalised; classifications go through the model's classifier and softmax / sigmoid. `use_activation`
switches the normalisation or the softmax / sigmoid off per request.

Poolers are plain objects, not modules: the model's classifier is a callable they borrow, and the Dense
layers come from the Sentence Transformers folders rather than the checkpoint, so neither shows up twice
(or as missing) among the model's parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.layers.activation import activation_from_qualname
from shardserve.pooling_params import PoolingParams


@dataclass
class PoolingBatch:
    """The requests of a step as the pooler sees them: where each prompt's rows sit in the packed hidden
    states, and what each asked for (params verified by the processor: task set, defaults filled)."""
    starts: torch.Tensor             # [B] row of each prompt's first token
    lens: torch.Tensor               # [B] its number of tokens
    params: list[PoolingParams]
    token_ids: torch.Tensor | None = None  # [T] the packed prompt tokens (STEP pooling reads them)

    def select(self, index: list[int]) -> PoolingBatch:
        if len(index) == len(self.params):
            return self
        at = torch.tensor(index, device=self.starts.device)
        return PoolingBatch(self.starts[at], self.lens[at], [self.params[i] for i in index], self.token_ids)


def pool_sequences(hidden: torch.Tensor, batch: PoolingBatch, pooling_type: str) -> torch.Tensor:
    """[B, hidden]: one row per prompt."""
    if pooling_type == "CLS":
        return hidden[batch.starts]
    if pooling_type == "LAST":
        return hidden[batch.starts + batch.lens - 1]
    if pooling_type != "MEAN":
        raise ValueError(f"{pooling_type} is not a sequence pooling type.")
    num = len(batch.params)
    segment = torch.repeat_interleave(torch.arange(num, device=hidden.device), batch.lens)
    offsets = torch.cumsum(batch.lens, 0) - batch.lens
    rows = torch.arange(len(segment), device=hidden.device) + (batch.starts - offsets)[segment]
    tokens = hidden if len(rows) == len(hidden) and bool((batch.starts == offsets).all()) else hidden[rows]
    sums = torch.zeros(num, hidden.size(1), dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment, tokens.float())
    return sums / batch.lens.unsqueeze(1)


def pool_tokens(hidden: torch.Tensor, batch: PoolingBatch, pooling_type: str) -> list[torch.Tensor]:
    """Per prompt, [its tokens (ALL) or its step-tag tokens (STEP), hidden]."""
    out = []
    for start, length, params in zip(batch.starts.tolist(), batch.lens.tolist(), batch.params):
        rows = hidden[start:start + length]
        if pooling_type == "STEP" and params.step_tag_id is not None:
            rows = rows[batch.token_ids[start:start + length] == params.step_tag_id]
        out.append(rows)
    return out


def _uniform(params: list[PoolingParams], *names: str) -> bool:
    first = params[0]
    return all(all(getattr(p, n) == getattr(first, n) for n in names) for p in params)


def _finish_embeddings(x: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Matryoshka cut, then normalisation; x: [..., hidden]."""
    if params.dimensions is not None:
        x = x[..., :params.dimensions]
    return F.normalize(x, p=2, dim=-1) if params.use_activation else x


class Pooler:
    """Dispatches a step's requests by task; subclasses implement the tasks their model serves."""

    def __call__(self, hidden: torch.Tensor, batch: PoolingBatch) -> list[torch.Tensor]:
        by_task: dict[str, list[int]] = {}
        for i, params in enumerate(batch.params):
            by_task.setdefault(params.task, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(batch.params)
        for task, index in by_task.items():
            for i, result in zip(index, self.pool(task, hidden, batch.select(index))):
                out[i] = result.float()
        return out

    def pool(self, task: str, hidden: torch.Tensor, batch: PoolingBatch) -> list[torch.Tensor]:
        raise NotImplementedError


class EmbeddingPooler(Pooler):
    def __init__(self, sequence_pooling: str, token_pooling: str, projector: nn.Module | None = None):
        self.sequence_pooling, self.token_pooling = sequence_pooling, token_pooling
        self.projector = projector  # Sentence Transformers Dense layers, or None

    def _project(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The projector is built in the model's dtype; MEAN pooling sums in float32.
        return x.float() if self.projector is None else self.projector(x.to(dtype)).float()

    def pool(self, task, hidden, batch):
        params = batch.params
        if task == "token_embed":
            return [_finish_embeddings(self._project(rows, hidden.dtype), p)
                    for rows, p in zip(pool_tokens(hidden, batch, self.token_pooling), params)]
        pooled = self._project(pool_sequences(hidden, batch, self.sequence_pooling), hidden.dtype)
        if _uniform(params, "dimensions", "use_activation"):  # the usual case: one batched operation
            return list(_finish_embeddings(pooled, params[0]).unbind(0))
        return [_finish_embeddings(row, p) for row, p in zip(pooled, params)]


def classification_activation(hf_config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sigmoid for one label or multi-label problems, softmax over the labels otherwise."""
    if getattr(hf_config, "num_labels", 2) == 1 or \
            getattr(hf_config, "problem_type", None) == "multi_label_classification":
        return torch.sigmoid
    return lambda x: torch.softmax(x, dim=-1)


def score_activation(hf_config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a cross-encoder's scores go through: the activation its Sentence Transformers config names
    (a whitelisted torch.nn module), else the classification activation."""
    st = getattr(hf_config, "sentence_transformers", None)
    name = (st or {}).get("activation_fn") if isinstance(st, dict) else None
    name = name or getattr(hf_config, "sbert_ce_default_activation_function", None)
    return activation_from_qualname(name) if name else classification_activation(hf_config)


class ClassificationPooler(Pooler):
    """classify / score: pool, classify, activate. token_classify: classify every token (or step) row, with
    the model's token classifier where it differs from the sequence one (BERT's [CLS] pooler is not applied
    to every token). A reward model has no classifier: its token outputs are the hidden states themselves,
    not activated."""

    def __init__(self, hf_config, sequence_pooling: str, token_pooling: str,
                 classifier: Callable[[torch.Tensor], torch.Tensor] | None,
                 token_classifier: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.sequence_pooling, self.token_pooling = sequence_pooling, token_pooling
        self.classifier = classifier
        self.token_classifier = token_classifier or classifier
        self.activations = {"classify": classification_activation(hf_config),
                            "score": score_activation(hf_config),
                            "token_classify": classification_activation(hf_config) if classifier else None}

    def pool(self, task, hidden, batch):
        params, activation = batch.params, self.activations[task]

        def activate(logits: torch.Tensor, p: PoolingParams) -> torch.Tensor:
            logits = logits.float()
            if p.returned_token_ids is not None:
                logits = logits[..., p.returned_token_ids]
            return activation(logits) if activation is not None and p.use_activation else logits

        if task == "token_classify":
            classify = self.token_classifier or (lambda rows: rows)
            return [activate(classify(rows), p)
                    for rows, p in zip(pool_tokens(hidden, batch, self.token_pooling), params)]
        logits = self.classifier(pool_sequences(hidden, batch, self.sequence_pooling).to(hidden.dtype))
        if _uniform(params, "use_activation"):
            return list(activate(logits, params[0]).unbind(0))
        return [activate(row, p) for row, p in zip(logits, params)]
