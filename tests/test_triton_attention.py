"""Triton attention kernels against the pure-torch reference on the same paged cache: in Triton's
interpreter on a CPU (small shapes), compiled on a GPU (small and real shapes)."""
from __future__ import annotations

import pytest
import torch

from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.attention import triton_backend
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _paged_sequences(lens, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A cache with random contents and, per sequence, a block table of blocks scattered through it."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim, generator=g).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[start:start + nb])
        start += nb
    return cache, tables


def _slots(table, block_size, positions):
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, window, softcap",
                         [(4, 4, 16, 16, None, None), (8, 2, 32, 8, None, None), (6, 1, 24, 5, None, None),
                          (8, 2, 32, 8, 19, None), (8, 2, 32, 8, None, 1.5)])
def test_decode_matches_torch(num_heads, num_kv_heads, head_dim, block_size, window, softcap, dtype):
    lens = [1, 17, 70, 33, block_size]
    cache, tables = _paged_sequences(lens, num_kv_heads, head_dim, block_size, dtype)
    max_blocks = max(len(t) for t in tables)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long, device=DEVICE),
                             block_size=block_size, num_decode_tokens=len(lens),
                             decode_block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables],
                                                              device=DEVICE),
                             decode_seq_lens=torch.tensor(lens, device=DEVICE))
    q = torch.randn(len(lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    scale = head_dim ** -0.5
    ref = TorchAttentionBackend().decode(q.float(), cache.float(), meta, scale, window, softcap)
    kernels = triton_backend.TritonAttentionBackend().kernels
    # one program per sequence and head group, and the context split with a join (with a window, splits
    # before it read nothing); into NaN-filled outputs, so a head nothing wrote (no join) shows
    for splits in (1, 2, 8, 8):  # twice with splits: the first launch must leave its join counters at zero
        out = kernels.paged_decode(q, cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                   out=torch.full_like(q, float("nan")), num_splits=splits, sliding_window=window,
                                   softcap=softcap)
        torch.testing.assert_close(out.float(), ref, **_tol(dtype))
    auto = kernels.paged_decode(q, cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                                out=torch.full_like(q, float("nan")), sliding_window=window, softcap=softcap)
    torch.testing.assert_close(auto.float(), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, window, softcap",
                         [(4, 2, 16, 4, None, None), (3, 3, 20, 16, None, None), (4, 2, 16, 4, 11, None),
                          (4, 2, 16, 4, None, 1.5)])
def test_forward_mixed_step_matches_torch(num_heads, num_kv_heads, head_dim, block_size, window, softcap, dtype):
    """One step as the model runner lays it out: decode rows first, then prefills (from scratch and over a
    cached prefix), new K/V written at their slots (a slot of -1 is a padding row, written nowhere)."""
    # (context already cached, new query tokens) per sequence; the first three are decode rows
    shapes = [(5, 1), (0, 1), (40, 1), (0, 23), (9, 18), (33, 40)]
    lens = [c + n for c, n in shapes]
    cache, tables = _paged_sequences(lens, num_kv_heads, head_dim, block_size, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    total = sum(n for _, n in shapes) + 1  # + one padding row
    # q, k, v as a model has them: strided views into one QKV projection output
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = q.view(total, num_heads, head_dim), k.view(total, -1, head_dim), v.view(total, -1, head_dim)

    def metadata():
        slots, prefills, row = [], [], 0
        for (ctx, n), table in zip(shapes, tables):
            slots += _slots(table, block_size, range(ctx, ctx + n))
            if n > 1:
                kv = torch.tensor(_slots(table, block_size, range(ctx + n)), device=DEVICE)
                prefills.append(PrefillSeq(row, n, ctx, kv))
            row += n
        decodes = [(c + n, t) for (c, n), t in zip(shapes, tables) if n == 1]
        width = max(len(t) for _, t in decodes)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots + [-1], device=DEVICE), block_size=block_size,
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for _, t in decodes], device=DEVICE),
            decode_seq_lens=torch.tensor([n for n, _ in decodes], device=DEVICE), prefills=prefills)

    scale = head_dim ** -0.5
    ref_cache = cache.float().clone()
    ref = TorchAttentionBackend().forward(q.float()[:-1], k.float()[:-1], v.float()[:-1], ref_cache,
                                          _trimmed(metadata()), scale, window, softcap)
    out = triton_backend.TritonAttentionBackend().forward(q, k, v, cache, metadata(), scale, window, softcap)
    torch.testing.assert_close(out[:-1].float(), ref, **_tol(dtype))
    torch.testing.assert_close(cache.float(), ref_cache, **_tol(dtype))  # same slots written, padding nowhere


def _trimmed(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step without its padding row (the torch backend has no notion of one)."""
    meta.slot_mapping = meta.slot_mapping[:-1]
    return meta


@pytest.mark.skipif(DEVICE.type != "cuda", reason="real shapes need a GPU")
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(16, 8, 128), (32, 8, 64)])
def test_decode_real_shapes_on_gpu(num_heads, num_kv_heads, head_dim):
    lens = [1, 200, 1500, 4096] * 8
    cache, tables = _paged_sequences(lens, num_kv_heads, head_dim, 16, torch.bfloat16)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long, device=DEVICE),
                             block_size=16, num_decode_tokens=len(lens),
                             decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                              device=DEVICE),
                             decode_seq_lens=torch.tensor(lens, device=DEVICE))
    q = torch.randn(len(lens), num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    ref = TorchAttentionBackend().decode(q.float(), cache.float(), meta, head_dim ** -0.5)
    out = triton_backend.TritonAttentionBackend().kernels.paged_decode(
        q, cache, meta.decode_block_tables, meta.decode_seq_lens, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
