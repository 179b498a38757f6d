"""A pooling step's inputs: prefill-only requests, each prompt whole, packed back to back.

The step's prompts are packed without padding, shortest first (prompts of one length side by side attend
as one batch, layers/attention/packed.py): one forward over all their tokens, attention per prompt over
its own tokens (causal for decoders, both ways for encoders) without a KV cache, since nothing reads the
keys and values after the step. Positions restart at 0 for each prompt. The last pipeline stage then
pools the hidden states into one output per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardserve.engine.scheduler import ScheduledRequest
from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.layers.pooler import Pooler, PoolingBatch


@dataclass
class PoolingStep:
    request_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    batch: PoolingBatch
    first_stage_inputs: dict = field(default_factory=dict)  # token_type_ids, when a prompt has them

    def pool(self, pooler: Pooler, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """request id -> its pooled output (a CPU tensor)."""
        return {rid: out.cpu() for rid, out in zip(self.request_ids, pooler(hidden, self.batch))}


def prepare_pooling_step(scheduled: list[ScheduledRequest], device: torch.device, causal: bool) -> PoolingStep:
    scheduled = sorted(scheduled, key=lambda s: len(s.token_ids))
    input_ids: list[int] = []
    lens, params, token_types = [], [], []
    for s in scheduled:
        new = s.new_request  # a pooling request is scheduled once, whole, as a new request
        input_ids.extend(s.token_ids)
        lens.append(len(s.token_ids))
        params.append(new.pooling_params)
        token_types.append(new.token_type_ids)
    lens_t = torch.tensor(lens, device=device)
    starts_t = torch.cumsum(lens_t, 0) - lens_t
    ids_t = torch.tensor(input_ids, dtype=torch.long, device=device)
    positions = torch.arange(len(input_ids), device=device) - torch.repeat_interleave(starts_t, lens_t)
    meta = AttentionMetadata(slot_mapping=None, causal=causal,
                             prefills=[PrefillSeq(start, n, 0, None) for start, n in zip(starts_t.tolist(), lens)])
    step = PoolingStep([s.request_id for s in scheduled], ids_t, positions, meta,
                       PoolingBatch(starts_t, lens_t, params, token_ids=ids_t))
    if any(t is not None for t in token_types):
        types = [t if t is not None else [0] * n for t, n in zip(token_types, lens)]
        step.first_stage_inputs["token_type_ids"] = torch.tensor([t for seq in types for t in seq], device=device)
    return step
