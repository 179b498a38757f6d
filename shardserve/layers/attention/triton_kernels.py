"""Triton kernels for attention over the paged KV cache.

The cache of one layer is [2, num_blocks, num_kv_heads, block_size, head_dim]: the tokens of one head in
one block lie together, so a key's address is ((block * Hkv + head) * block_size + offset) * head_dim.
Every kernel finds a token's block through the sequence's block table, one lookup per token, so any
block size works.

- `store_kv`: writes a step's new keys and values at their slots (a slot < 0 is a padding row: skipped).
- `paged_decode`: one query token per sequence (flash-decoding): the sequence's context is split across
  programs, each program takes all the query heads that share one KV head (GQA reads each key once),
  and the last of a sequence's splits to finish joins them by their log-sum-exp (a counter per sequence and
  KV head says which is last: no second launch, which at batch 1 is one launch fewer per layer).
- `paged_prefill`: many query tokens per sequence, over the sequence's cached prefix and themselves
  (already stored), causal; one launch for all the step's prefills.

A sliding window (`window`: keys a query sees back from itself, itself included) bounds every loop over keys
from below, so keys before a query's window are not read; without one it is passed as _NO_WINDOW.

Scores accumulate in fp32 whatever the cache dtype. Grids depend only on host-known sizes (the block-table
width, the number of sequences), never on device values, so decode launches can be captured in a CUDA graph.

A kernel compiles once per distinct constexpr value and (Triton's specialisation) per integer argument that is 1
or a multiple of 16 and per pointer that is or is not 16-byte aligned. A compile takes about a second and stalls
the step, and with it every request in flight: what changes from step to step (the block tables' width, the
split of a context, how many splits) is a runtime argument not specialised on (`do_not_specialize`), so a
server meets each kernel's few variants at its first steps, not mid-traffic at a new batch's shape. (The model
runner keeps the step's inputs 16-byte aligned likewise.)
On a CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from shardserve.layers import gemv


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEAD_DIM_PAD: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        d = tl.arange(0, HEAD_DIM_PAD)
        mask = d < HEAD_DIM
        dst = ((slot // BLOCK_SIZE * NUM_KV_HEADS + head) * BLOCK_SIZE + slot % BLOCK_SIZE) * HEAD_DIM + d
        k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); kv_cache: [2, num_blocks, Hkv, block_size, D]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.is_contiguous()
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, BLOCK_SIZE=kv_cache.shape[3], HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim))


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, pos, end, kv_head, d, d_ok,
                  NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The keys and values at positions `pos` (those below `end`) of one sequence and KV head, found
    through its block table, as [BLOCK_N, HEAD_DIM_PAD] tiles (zeros elsewhere), and which are valid."""
    valid = pos < end
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
    row = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + pos % BLOCK_SIZE
    addr = row[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    mask = valid[:, None] & d_ok[None, :]
    return tl.load(k_cache_ptr + addr, mask=mask, other=0.0), tl.load(v_cache_ptr + addr, mask=mask, other=0.0), valid


@triton.jit
def _attend_tile(q, k, v, keep, scale, softcap, m_i, l_i, acc, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key tile of flash attention: the scores of q's rows against k where `keep` (capped as
    softcap * tanh(s / softcap) with SOFTCAP), folded into each row's running maximum m_i, softmax
    denominator l_i and weighted sum of values acc."""
    if IEEE:  # fp32 inputs: no TF32 rounding, so results match the torch reference closely
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if SOFTCAP:  # tanh(x) = 1 - 2 / (1 + e^2x); e^2x overflowing to inf gives 1
        s = softcap * (1.0 - 2.0 / (1.0 + tl.exp(s * (2.0 / softcap))))
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays empty
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _join_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, head, stride_ot, stride_oh, num_splits,
                 NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 MAX_SPLITS: tl.constexpr):
    """One head's output from its splits' partial outputs, weighed by their log-sum-exps. Loads bypass L1 (.cg):
    other programs wrote the partials, and this SM may hold stale lines of the same buffer from an earlier step."""
    s = tl.arange(0, MAX_SPLITS)  # one vector for any number of splits, those past num_splits masked
    part = (seq * NUM_HEADS + head) * num_splits + s
    d = tl.arange(0, HEAD_DIM_PAD)
    lse = tl.load(part_lse_ptr + part, mask=s < num_splits, other=float("-inf"), cache_modifier=".cg")
    weight = tl.exp(lse - tl.max(lse, 0))  # the split of the last key has keys: the maximum is finite
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], mask=(s < num_splits)[:, None],
                    other=0.0, cache_modifier=".cg")
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_table", "tokens_per_split", "num_splits"])
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, out_ptr,
                         part_out_ptr, part_lse_ptr, counters_ptr, scale, softcap,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_table, tokens_per_split, window,
                         num_splits, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                         IEEE: tl.constexpr, SOFTCAP: tl.constexpr, MAX_SPLITS: tl.constexpr,
                         LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:  # the output projection's GEMV may start now (layers/gemv.py: it waits for our writes)
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    end = tl.minimum(split * tokens_per_split + tokens_per_split, seq_len)
    start = tl.maximum(split * tokens_per_split, seq_len - window)  # a split before the window reads nothing

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_table
    for n0 in range(start, end, BLOCK_N):
        k, v, valid = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, n0 + tl.arange(0, BLOCK_N), end, kv_head,
                                    d, d_ok, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
        m_i, l_i, acc = _attend_tile(q, k, v, valid[None, :], scale, softcap, m_i, l_i, acc, IEEE, SOFTCAP)

    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])
    else:
        # A split past the sequence's end saw no keys: its lse is -inf and it weighs nothing in the join.
        part = (seq * NUM_HEADS + heads) * num_splits + split
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], out, mask=head_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=head_ok)
        # Count this split done. The barrier orders every thread's stores above before the count, whose release
        # publishes them; the split that counts last acquires all the others' and joins. It resets the counter
        # for the next launch (every launch leaves the counters at zero).
        tl.debug_barrier()
        counter = counters_ptr + seq * NUM_KV_HEADS + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
            tl.store(counter, 0)
            for g_i in tl.static_range(GROUP):
                _join_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_head * GROUP + g_i, stride_ot, stride_oh,
                             num_splits, NUM_HEADS, HEAD_DIM, HEAD_DIM_PAD, MAX_SPLITS)


# Decode programs the GPU should have in flight before a sequence's context is split further.
_TARGET_PROGRAMS = 512
_MAX_SPLITS = 32


def decode_splits(num_seqs: int, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """How many programs share one sequence's context: enough to fill the device when the batch is small
    and contexts are long, a power of two (the join reads them as one vector), one when the batch does."""
    by_context = triton.cdiv(max_len, 4 * block_n)  # a split keeps a few key tiles of work
    by_occupancy = triton.cdiv(_TARGET_PROGRAMS, max(num_seqs * num_kv_heads, 1))
    return min(triton.next_power_of_2(max(min(by_context, by_occupancy), 1)), _MAX_SPLITS)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                 block_n: int | None = None, num_warps: int = 4, sliding_window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """q: [B, H, D]; block_tables: [B, max_blocks] (int32/int64); seq_lens: [B], each >= 1. -> [B, H, D].
    The grid depends on B and the table's width only. `block_n` (keys per tile) and `num_warps` are the
    tuning knobs benchmarks/gpu_kernels.py sweeps."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and kv_cache.is_contiguous() and block_tables.stride(-1) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    assert out.stride(-1) == 1
    block_n = block_n or (16 if _interpreting() else 64)
    max_len = block_tables.shape[1] * block_size
    splits = num_splits or decode_splits(num_seqs, num_kv_heads, max_len, block_n)
    assert splits <= _MAX_SPLITS
    tokens_per_split = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    head_dim_pad = triton.next_power_of_2(head_dim)
    part_out = part_lse = counters = out  # unused when there is one split
    if splits > 1:
        part_out = torch.empty(num_seqs * num_heads * splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs * num_heads * splits, dtype=torch.float32, device=q.device)
        counters = _split_counters(q.device, num_seqs * num_kv_heads)
    _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, out, part_out, part_lse, counters, scale,
        softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), tokens_per_split,
        sliding_window or _NO_WINDOW, splits, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
        SOFTCAP=bool(softcap), MAX_SPLITS=_MAX_SPLITS, LAUNCH_DEPENDENTS=gemv.pdl(q.device), num_warps=num_warps)
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, needed: int) -> torch.Tensor:
    """The decode kernel's done-split counters (one per sequence and KV head), zero between launches, shared by
    every layer and step on a device (launches on one stream run one after another). Allocated when first
    needed, large enough for any usual batch, so never inside a CUDA graph's capture (its eager warm-up at the
    same size comes first)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "the split counters must be allocated before a graph is captured"
        counters = _COUNTERS[device] = torch.zeros(max(needed, 1 << 14), dtype=torch.int32, device=device)
    return counters


@triton.jit(do_not_specialize=["stride_table"])
def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, query_starts_ptr, query_lens_ptr,
                          context_lens_ptr, out_ptr, scale, softcap, stride_qt, stride_qh, stride_ot, stride_oh,
                          stride_table, window,
                          NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    query_len = tl.load(query_lens_ptr + seq)
    if m_block * BLOCK_M < query_len:
        query_start = tl.load(query_starts_ptr + seq)
        context_len = tl.load(context_lens_ptr + seq)
        kv_head = head // GROUP
        m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < query_len
        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        rows = (query_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        query_pos = context_len + m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        total = context_len + query_len
        if CAUSAL:  # keys past this tile's last query are masked for all its rows: not read at all
            total = tl.minimum(total, context_len + (m_block + 1) * BLOCK_M)
        table_row = tables_ptr + seq.to(tl.int64) * stride_table
        first = tl.maximum(context_len + m_block * BLOCK_M - window + 1, 0)  # the tile's first query's window
        for n0 in range(first, total, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            k, v, valid = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, pos, total, kv_head, d, d_ok,
                                        NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
            distance = query_pos[:, None] - pos[None, :]
            keep = valid[None, :] & (distance < window) & (distance > -window)
            if CAUSAL:
                keep = keep & (distance >= 0)
            m_i, l_i, acc = _attend_tile(q, k, v, keep, scale, softcap, m_i, l_i, acc, IEEE, SOFTCAP)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
                  out: torch.Tensor, causal: bool = True, block: int | None = None, num_warps: int = 4,
                  sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q, out: [T, H, D] rows of the whole step; each sequence's rows are query_starts[i] ..
    + query_lens[i], its keys (context then query, all stored) found through block_tables[i]. `block` (the
    query and key tile) and `num_warps`: as paged_decode's knobs."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    block = block or (16 if _interpreting() else (64 if head_dim <= 128 else 32))
    _paged_prefill_kernel[(triton.cdiv(max_query_len, block), len(query_lens), num_heads)](
        q, kv_cache[0], kv_cache[1], block_tables, query_starts, query_lens, context_lens, out, scale, softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        sliding_window or _NO_WINDOW, NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_M=block,
        BLOCK_N=block, CAUSAL=causal, IEEE=q.dtype == torch.float32, SOFTCAP=bool(softcap), num_warps=num_warps)
    return out


_NO_WINDOW = 1 << 30  # a window longer than any context: every key is seen


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
