"""Attention of a step without a KV cache (pooling models): packed prompts, each attending to itself only.

One SDPA call per prompt costs more than the attention itself for short prompts, so prompts that sit side
by side in the packed step (the pooling runner packs them sorted by length) are attended in batches:
right-padded to the batch's longest, with padded keys masked out (causal attention never reaches them),
and a batch grows only while padding adds little work. Prompts all of one length need no padding: their
rows are viewed as a batch in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_PADDING = 0.25    # a batch's padded attention area may exceed its real area by this fraction ...
SHORT_PROMPT = 32     # ... unless its prompts are this short: attention of those costs next to nothing


@dataclass
class PromptBatch:
    start: int                         # rows start:end of the packed step hold the batch's prompts
    end: int
    count: int
    max_len: int
    gather: torch.Tensor | None = None    # [count * max_len] row of each padded position (None: no padding)
    real: torch.Tensor | None = None      # [end - start] which padded positions hold the real tokens
    key_mask: torch.Tensor | None = None  # [count, 1, 1, max_len] real keys (non-causal attention)


def plan_batches(starts: list[int], lens: list[int], causal: bool, device: torch.device) -> list[PromptBatch]:
    """Back-to-back prompts grouped into batches (see the module doc)."""
    groups: list[list[int]] = []
    area = longest = 0
    for i, n in enumerate(lens):
        if groups:
            last = groups[-1][-1]
            grown = max(longest, n)
            padded = (len(groups[-1]) + 1) * grown ** 2
            if starts[i] == starts[last] + lens[last] and (grown <= SHORT_PROMPT or
                                                           padded <= (1 + MAX_PADDING) * (area + n * n)):
                groups[-1].append(i)
                area, longest = area + n * n, grown
                continue
        groups.append([i])
        area, longest = n * n, n
    return [_batch([starts[i] for i in g], [lens[i] for i in g], causal, device) for g in groups]


def _batch(starts: list[int], lens: list[int], causal: bool, device: torch.device) -> PromptBatch:
    longest = max(lens)
    batch = PromptBatch(starts[0], starts[-1] + lens[-1], len(lens), longest)
    if min(lens) == longest:
        return batch
    positions = torch.arange(longest, device=device)
    lens_t = torch.tensor(lens, device=device)
    real = positions[None, :] < lens_t[:, None]                           # [count, longest]
    # padded positions read their prompt's first row: any real row will do, the mask hides it
    batch.gather = torch.where(real, torch.tensor(starts, device=device)[:, None] + positions,
                               torch.tensor(starts, device=device)[:, None]).view(-1)
    batch.real = real.view(-1).nonzero().squeeze(1)
    if not causal:
        batch.key_mask = real[:, None, None, :]
    return batch


def packed_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batches: list[PromptBatch],
                          scale: float, causal: bool) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    heads, head_dim = q.size(1), q.size(2)
    for b in batches:
        rows = slice(b.start, b.end)
        if b.gather is None:
            qb, kb, vb = (t[rows].view(b.count, b.max_len, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        else:
            qb, kb, vb = (t.index_select(0, b.gather).view(b.count, b.max_len, -1, head_dim).transpose(1, 2)
                          for t in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.key_mask, is_causal=causal, scale=scale,
                                           enable_gqa=heads != k.size(1))
        o = o.transpose(1, 2).reshape(-1, heads, head_dim)
        out[rows] = o if b.real is None else o.index_select(0, b.real)
    return out
