"""A pooling step: prefill-only requests, each prompt whole, pooled into one output per request.

The step's prompts are packed back to back, no padding: one forward over all their tokens, attention run
per prompt over its own tokens (causal for decoders, both ways for encoders) without a KV cache, since
nothing reads the keys and values after the step. Positions restart at 0 for each prompt.
"""
from __future__ import annotations

import torch

from shardserve.engine.scheduler import ScheduledRequest
from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.layers.pooler import PoolingBatch


def execute_pooling(model, scheduled: list[ScheduledRequest], device: torch.device) -> dict[str, torch.Tensor]:
    """request id -> its pooled output (a CPU tensor)."""
    if not scheduled:
        return {}
    # Shortest first: prompts of one length side by side attend as one batch (layers/attention/packed.py).
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
    meta = AttentionMetadata(slot_mapping=None, causal=model.is_causal,
                             prefills=[PrefillSeq(start, n, 0, None)
                                       for start, n in zip(starts_t.tolist(), lens)])
    kwargs = {}
    if any(t is not None for t in token_types):
        types = [t if t is not None else [0] * n for t, n in zip(token_types, lens)]
        kwargs["token_type_ids"] = torch.tensor([t for seq in types for t in seq], device=device)
    hidden = model(ids_t, positions, meta, **kwargs)
    outputs = model.pooler(hidden, PoolingBatch(starts_t, lens_t, params, token_ids=ids_t))
    return {s.request_id: out.cpu() for s, out in zip(scheduled, outputs)}
