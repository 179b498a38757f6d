"""Attention of a step without a KV cache (pooling models): packed prompts, each attending to itself only.

The prompts lie back to back from row 0. One SDPA call per prompt costs more than the attention itself for
short prompts, so back-to-back prompts of one length (the pooling runner packs a step's prompts sorted by
length) attend as one batch: their rows viewed in place as [prompts, length, heads, head_dim], no copy and
no padding. The outputs are joined by one concatenation rather than copied into place call by call: on a
CPU a small copy costs its call overhead, not its bytes. (Padding neighbours of different lengths to one
batch with a key mask measured slower: the gathers and the masked kernel cost more than the calls saved.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def equal_length_runs(starts: list[int], lens: list[int]) -> list[tuple[int, int, int]]:
    """(first row, number of prompts, length) of each run of back-to-back prompts of one length."""
    runs: list[list[int]] = []
    for start, n in zip(starts, lens):
        if start != (runs[-1][0] + runs[-1][1] * runs[-1][2] if runs else 0):
            raise ValueError("Packed prompts must lie back to back from row 0.")
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, n])
    return [tuple(r) for r in runs]


def window_mask(query_pos: torch.Tensor, num_keys: int, causal: bool, sliding_window: int | None) -> torch.Tensor:
    """[queries, keys] where the query at each position may see the key at 0 .. num_keys - 1: causally (no key
    after it) and, with a sliding window, none `sliding_window` or more before it (or, not causal, after it)."""
    key_pos = torch.arange(num_keys, device=query_pos.device)[None, :]
    query_pos = query_pos[:, None]
    mask = key_pos <= query_pos if causal else torch.ones(1, num_keys, dtype=torch.bool, device=key_pos.device)
    if sliding_window:
        mask = mask & ((query_pos - key_pos).abs() < sliding_window)
    return mask


def sdpa(q, k, v, scale, mask=None, causal=False, softcap: float | None = None) -> torch.Tensor:
    """q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D]; mask: True where a query sees a key; causal as SDPA's (query i
    sees keys 0..i). `softcap`: logits capped as softcap * tanh(logits / softcap) before the softmax (Gemma 2),
    which SDPA cannot do: written out then, in fp32."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.size(1) != k.size(1))
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    logits = q.float() @ k.transpose(-1, -2) * scale
    logits = softcap * torch.tanh(logits / softcap)
    if causal:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1) @ v).to(q.dtype)


def packed_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]],
                          scale: float, causal: bool, sliding_window: int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]; `runs` cover rows 0..T in order."""
    outs = []
    heads, head_dim = q.size(1), q.size(2)
    for start, count, length in runs:
        rows = slice(start, start + count * length)
        qb, kb, vb = (t[rows].view(count, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, causal
        if sliding_window and length > sliding_window:
            mask, is_causal = window_mask(torch.arange(length, device=q.device), length, causal, sliding_window), False
        o = sdpa(qb, kb, vb, scale, mask, is_causal, softcap)
        outs.append(o.transpose(1, 2).reshape(-1, heads, head_dim))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
