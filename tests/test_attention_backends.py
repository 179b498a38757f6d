"""Attention backends against the pure-torch reference on the same paged cache."""
from __future__ import annotations

import pytest
import torch

from shardserve.layers.attention import AttentionMetadata, get_attention_backend
from shardserve.layers import cpu_kernels
from shardserve.layers.attention import cpu_backend, flash_backend, triton_backend
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.layers.attention.torch_backend import TorchAttentionBackend


def _decode_case(num_heads, num_kv_heads, head_dim, lens, block_size=16, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered through the cache
    tables, start = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[start:start + nb])
        start += nb
    max_blocks = max(len(t) for t in tables)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), block_size=block_size,
                             num_decode_tokens=len(lens),
                             decode_block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
                             decode_seq_lens=torch.tensor(lens))
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    return q, cache, meta


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernel")
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size",
                         [(4, 4, 64, 16), (8, 2, 32, 16), (12, 1, 80, 16), (6, 3, 40, 5), (2, 2, 128, 32)])
@pytest.mark.parametrize("window", [None, 1, 21])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paged_decode_matches_torch(num_heads, num_kv_heads, head_dim, block_size, window, dtype):
    # head_dim 80 and 40 leave a partial 16-lane vector; block sizes 5 and 32 a partial 16-key chunk.
    q, cache, meta = _decode_case(num_heads, num_kv_heads, head_dim, lens=[1, 17, 200, 33, 16],
                                  block_size=block_size, num_blocks=128)
    q = 4 * q  # peaked softmaxes: later keys often raise the running maximum, so the rescaling runs
    # as the layer has it: a view into the QKV output, rows strided past the keys and values
    q = torch.cat([q.flatten(1), torch.randn(q.shape[0], 40)], 1)[:, :q[0].numel()].view(q.shape)
    q, cache = q.to(dtype), cache.to(dtype)
    # a sliding window of 21 starts mid-block and mid-chunk, and covers all of the shorter sequences
    out = cpu_backend.CpuPagedAttentionBackend().decode(q, cache, meta, head_dim ** -0.5, window)
    # bf16: against the reference in fp32 on the same (bf16) values; the kernel computes in fp32 and rounds once
    ref = TorchAttentionBackend().decode(q.float(), cache.float(), meta, head_dim ** -0.5, window).to(dtype)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group, head_dim, block_size", [(3, 64, 16), (4, 40, 5), (16, 256, 16)])
def test_cpu_paged_decode_attends_a_sequences_consecutive_rows_together(dtype, group, head_dim, block_size):
    """Rows that are one sequence's consecutive positions (a speculative step's drafts, a short prompt chunk) are
    attended in one pass over its keys: each row still sees exactly its own prefix. Runs across block boundaries,
    longer than the kernel takes at once (20 rows), beside single rows, and rows one key apart whose blocks
    differ (other sequences: not a run) all match the reference."""
    num_kv_heads = 2
    _, cache, _ = _decode_case(group * num_kv_heads, num_kv_heads, head_dim, lens=[1], block_size=block_size,
                               num_blocks=256)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(256, generator=g).tolist()
    sequences = [(perm[0:12], range(27, 33)), (perm[12:20], range(9, 10)), (perm[20:40], range(40, 60)),
                 (perm[40:50], range(5, 6)), (perm[50:60], range(6, 7)), (perm[60:80], range(70, 73))]
    tables, lens = [], []
    for blocks, positions in sequences:
        for n in positions:
            tables.append(blocks)
            lens.append(n)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long), block_size=block_size,
                             num_decode_tokens=len(lens),
                             decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                             decode_seq_lens=torch.tensor(lens))
    q = 4 * torch.randn(len(lens), group * num_kv_heads, head_dim, generator=g)
    q, cache = q.to(dtype), cache.to(dtype)
    out = cpu_backend.CpuPagedAttentionBackend().decode(q, cache, meta, head_dim ** -0.5)
    ref = TorchAttentionBackend().decode(q.float(), cache.float(), meta, head_dim ** -0.5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 21])
def test_cpu_paged_decode_soft_caps_scores_as_torch_does(dtype, window):
    """Gemma 2's capped logits, softcap * tanh(s / softcap), with a cap low enough to bend most scores."""
    q, cache, meta = _decode_case(8, 2, 64, lens=[1, 17, 200, 33], num_blocks=64)
    q, cache = (4 * q).to(dtype), cache.to(dtype)
    ref = TorchAttentionBackend().decode(q.float(), cache.float(), meta, 0.125, window, softcap=1.5).to(dtype)
    uncapped = TorchAttentionBackend().decode(q.float(), cache.float(), meta, 0.125, window).to(dtype)
    out = cpu_backend.CpuPagedAttentionBackend().decode(q, cache, meta, 0.125, window, softcap=1.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert (out.float() - uncapped.float()).abs().max() > 0.1  # the cap changed the answer


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernel")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("num_kv_heads, lens", [(1, [200]), (2, [40, 1, 77])])
def test_cpu_paged_decode_splits_its_items_across_any_team(threads, num_kv_heads, lens):
    # Each thread takes a run of (sequence, kv head) items and prefetches into the next one: a team larger
    # than the items (threads with none), and runs that end mid-sequence, must not change a value.
    q, cache, meta = _decode_case(2 * num_kv_heads, num_kv_heads, 64, lens=lens, num_blocks=64)
    ref = TorchAttentionBackend().decode(q, cache, meta, 0.125)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_backend.CpuPagedAttentionBackend().decode(q, cache, meta, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

def test_auto_backend_prefers_the_compiled_cpu_kernel():
    expected = "cpu" if cpu_kernels.available() else "torch"
    assert get_attention_backend("auto").name == expected
    assert get_attention_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="Unknown attention backend"):
        get_attention_backend("nope")


def test_backend_choice_on_a_gpu_and_the_environment_variable(monkeypatch):
    """On a GPU auto takes FlashAttention only where a build imports and runs, else Triton; a broken or
    missing build is passed over, not a crash. The environment variable picks when the caller does not."""
    if flash_backend.load() is None:
        assert "vllm_flash_attn" in flash_backend.load_error() and "flash_attn" in flash_backend.load_error()
        expected = "triton" if triton_backend.available() else "torch"
        assert get_attention_backend("auto", "cuda", torch.bfloat16).name == expected
        with pytest.raises(RuntimeError, match="flash_attn attention backend is not usable"):
            get_attention_backend("flash_attn", "cuda", torch.bfloat16)
    assert not flash_backend.usable(torch.device("cpu"), torch.bfloat16, 16, 64)
    monkeypatch.setenv("SHARDSERVE_ATTENTION_BACKEND", "torch")
    assert get_attention_backend(None, "cpu").name == "torch"
    assert get_attention_backend("auto", "cpu").name != "torch" or not cpu_kernels.available()


@pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
def test_triton_backend_on_a_cpu_only_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_attention_backend("triton", "cpu").name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="runs on CUDA devices"):
        get_attention_backend("triton", "cpu")


def test_engine_takes_the_backend_it_is_given(model_dirs):
    from shardserve import LLM
    llm = LLM(model_dirs("llama"), attention_backend="torch", max_model_len=64)
    worker = llm.llm_engine.executor.worker
    assert {a.backend.name for a in worker.attention_layers} == {"torch"}
    with pytest.raises(ValueError, match="Unknown attention backend"):
        LLM(model_dirs("llama"), attention_backend="sdpa")


def test_vllms_names_and_attention_config_choose_the_same_backends(model_dirs, monkeypatch):
    """vLLM's backend names (TRITON_ATTN, FLASH_ATTN, CPU_ATTN, TORCH_SDPA, any case) name ours, from LLM(...),
    `attention_config={"backend": ...}` and the serve flags; a name of neither is refused."""
    from shardserve import LLM
    from shardserve.cli import build_parser, main, model_specs
    from shardserve.layers.attention.backend import backend_name
    assert [backend_name(n) for n in ("TRITON_ATTN", "FLASH_ATTN", "CPU_ATTN", "torch_sdpa", "Triton")] == \
        ["triton", "flash_attn", "cpu", "torch", "triton"]
    assert get_attention_backend("TORCH_SDPA", "cpu").name == "torch"
    llm = LLM(model_dirs("llama"), attention_config={"backend": "TORCH_SDPA"}, max_model_len=64)
    assert {a.backend.name for a in llm.llm_engine.executor.worker.attention_layers} == {"torch"}
    with pytest.raises(ValueError, match="Unknown attention backend 'flashinfer'"):
        LLM(model_dirs("llama"), attention_backend="FLASHINFER")
    with pytest.raises(ValueError, match="attention_backend and attention_config.backend are mutually exclusive"):
        LLM(model_dirs("llama"), attention_backend="torch", attention_config={"backend": "torch"})
    with pytest.raises(ValueError, match="attention_config takes backend"):
        LLM(model_dirs("llama"), attention_config={"flash_attn_version": 3})

    def spec(*flags):
        return model_specs(build_parser().parse_args(["serve", "a", *flags]))[0]
    assert spec("--attention-backend", "TRITON_ATTN").attention_backend == "triton"
    assert spec("-ac", '{"backend": "CPU_ATTN"}').engine_config().attention_backend == "CPU_ATTN"
    monkeypatch.setattr("shardserve.cluster.ray_cluster.connect", lambda address: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit):  # argparse's own: not one of the choices
        main(["serve", "a", "--attention-backend", "FLASHINFER"])


def _naive_attention(q, keys, values, query_pos, causal, window, scale):
    """Query by query, head by head: softmax over the keys each query may see (by key position)."""
    out = torch.empty_like(q)
    group = q.size(1) // keys.size(1)
    for i, p in enumerate(query_pos):
        seen = [j for j in range(keys.size(0)) if (not causal or j <= p) and (not window or abs(p - j) < window)]
        for h in range(q.size(1)):
            kh, vh = keys[seen, h // group], values[seen, h // group]
            out[i, h] = torch.softmax(kh @ q[i, h] * scale, 0) @ vh
    return out


@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_of_each_path_matches_naive_attention(window):
    """The torch reference's windowed decode, prefill over a cached prefix and packed self-attention (causal
    and not) against attention written out query by query."""
    g = torch.Generator().manual_seed(4)
    H, Hkv, D, bs, n, ctx = 4, 2, 8, 4, 13, 6
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (H, Hkv, Hkv))
    scale, backend = D ** -0.5, TorchAttentionBackend()
    slots = torch.tensor([[3, 0, 5, 1][i // bs] * bs + i % bs for i in range(n)])
    cache = torch.zeros(2, 6, Hkv, bs, D)
    # the first ctx tokens as a prompt, the rest as a chunk over them, the last one also as a decode
    first = backend.forward(q[:ctx], k[:ctx], v[:ctx], cache, AttentionMetadata(
        slot_mapping=slots[:ctx], block_size=bs, prefills=[PrefillSeq(0, ctx, 0, slots[:ctx])]), scale, window)
    torch.testing.assert_close(first, _naive_attention(q[:ctx], k[:ctx], v[:ctx], range(ctx), True, window, scale))
    chunk = backend.forward(q[ctx:], k[ctx:], v[ctx:], cache, AttentionMetadata(
        slot_mapping=slots[ctx:], block_size=bs, prefills=[PrefillSeq(0, n - ctx, ctx, slots)]), scale, window)
    torch.testing.assert_close(chunk, _naive_attention(q[ctx:], k, v, range(ctx, n), True, window, scale))
    meta = AttentionMetadata(slot_mapping=slots[-1:], block_size=bs, num_decode_tokens=1,
                             decode_block_tables=torch.tensor([[3, 0, 5, 1]]), decode_seq_lens=torch.tensor([n]))
    decode = backend.forward(q[-1:], k[-1:], v[-1:], cache, meta, scale, window)
    torch.testing.assert_close(decode, _naive_attention(q[-1:], k, v, [n - 1], True, window, scale))
    for causal in (True, False):  # two prompts of one length, one of another: no KV cache
        meta = AttentionMetadata(slot_mapping=None, causal=causal,
                                 prefills=[PrefillSeq(0, 5, 0, None), PrefillSeq(5, 5, 0, None),
                                           PrefillSeq(10, 3, 0, None)])
        out = backend.forward(q, k, v, None, meta, scale, window)
        for start, length in ((0, 5), (5, 5), (10, 3)):
            rows = slice(start, start + length)
            torch.testing.assert_close(out[rows], _naive_attention(q[rows], k[rows], v[rows], range(length), causal,
                                                                   window, scale))


def test_prefill_over_cached_prefix_equals_full_causal_attention():
    """A chunk attending to cached context gives what one causal pass over the whole sequence gives."""
    g = torch.Generator().manual_seed(1)
    H, Hkv, D, bs, n, ctx = 4, 2, 16, 4, 11, 6
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (H, Hkv, Hkv))
    cache = torch.zeros(2, 8, Hkv, bs, D)
    slots = torch.tensor([5 * bs + i for i in range(bs)] + [2 * bs + i for i in range(bs)]
                         + [7 * bs + i for i in range(bs)])[:n]
    backend = TorchAttentionBackend()
    full = backend.forward(q, k, v, None, AttentionMetadata(slot_mapping=slots, prefills=[
        PrefillSeq(0, n, 0, slots)]), D ** -0.5)
    backend.forward(q[:ctx], k[:ctx], v[:ctx], cache, AttentionMetadata(slot_mapping=slots[:ctx], block_size=bs,
                    prefills=[PrefillSeq(0, ctx, 0, slots[:ctx])]), D ** -0.5)
    chunk = backend.forward(q[ctx:], k[ctx:], v[ctx:], cache, AttentionMetadata(
        slot_mapping=slots[ctx:], block_size=bs, prefills=[PrefillSeq(0, n - ctx, ctx, slots)]), D ** -0.5)
    torch.testing.assert_close(chunk, full[ctx:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)])
def test_packed_self_attention_equals_one_prompt_at_a_time(causal, num_heads, num_kv_heads):
    """A pooling step's attention (no KV cache): prompts batched by length give what each prompt alone does."""
    lens = [3, 3, 5, 9, 9, 9, 30, 31, 40, 90, 90, 200]  # runs of one length are batched
    g = torch.Generator().manual_seed(0)
    total, head_dim = sum(lens), 16
    q = torch.randn(total, num_heads, head_dim, generator=g)
    k, v = (torch.randn(total, num_kv_heads, head_dim, generator=g) for _ in range(2))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    meta = AttentionMetadata(slot_mapping=None, causal=causal,
                             prefills=[PrefillSeq(s, n, 0, None) for s, n in zip(starts, lens)])
    out = TorchAttentionBackend().forward(q, k, v, None, meta, head_dim ** -0.5)
    assert len(meta.memo("equal_length_runs", list)) == 8
    for s, n in zip(starts, lens):
        rows = slice(s, s + n)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1), is_causal=causal,
            scale=head_dim ** -0.5, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[rows], ref, atol=1e-5, rtol=1e-5)


def _varlen_reference(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale, causal,
                      block_table, out, window_size=(-1, -1), softcap=0.0):
    """`flash_attn_varlen_func` over a paged cache as its documentation defines it: k, v are
    [num_blocks, block_size, Hkv, D]; sequence i has queries cu_seqlens_q[i]..[i + 1] and its first
    seqused_k[i] keys through block_table[i]; the causal mask is aligned to the bottom right; a query at
    position p sees no key before p - window_size[0] (-1: no bound); softcap > 0 caps the scaled scores as
    softcap * tanh(score / softcap)."""
    assert k.stride(-1) == 1 and causal and max_seqlen_q >= int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert cu_seqlens_q.dtype == seqused_k.dtype == block_table.dtype == torch.int32
    for i in range(len(seqused_k)):
        rows = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        num_keys, num_queries = int(seqused_k[i]), rows.stop - rows.start
        assert num_keys <= max_seqlen_k
        pos = torch.arange(num_keys, device=k.device)
        blocks = block_table[i, pos // k.shape[1]].long()
        keys, values = k[blocks, pos % k.shape[1]], v[blocks, pos % k.shape[1]]  # [L, Hkv, D]
        query_pos = (num_keys - num_queries + torch.arange(num_queries, device=k.device))[:, None]
        mask = pos[None, :] <= query_pos
        if window_size[0] >= 0:
            mask &= pos[None, :] >= query_pos - window_size[0]
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[rows], keys) * softmax_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


@pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
def test_flash_backend_lays_the_step_out_as_flash_attention_reads_it(monkeypatch):
    """The FlashAttention backend's own part: the varlen batch (decode rows as queries of one, prefills
    after them), int32 tables and lengths, the cache passed as a [blocks, block_size, Hkv, D] view. The kernel
    is stood in for by its documented semantics; the real one runs only on GPUs with a matching build. On a GPU
    the step runs there (the KV store's Triton kernel compiled: Triton reads TRITON_INTERPRET when a kernel is
    defined, so a GPU machine's cannot be interpreted), else on the CPU in Triton's interpreter (conftest)."""
    import sys
    import types
    fake = types.ModuleType("vllm_flash_attn")
    fake.flash_attn_varlen_func = _varlen_reference
    monkeypatch.setitem(sys.modules, "vllm_flash_attn", fake)
    monkeypatch.setattr(flash_backend, "_loaded", None)
    monkeypatch.setattr(flash_backend, "_load_error", None)
    assert flash_backend.load()[2] == "vllm_flash_attn"
    device = "cuda" if torch.cuda.is_available() else "cpu"

    g = torch.Generator().manual_seed(5)
    H, Hkv, D, bs = 4, 2, 16, 4
    shapes = [(6, 1), (0, 1), (9, 1), (0, 20), (7, 18)]  # (cached context, new tokens): three decode rows
    cache = torch.randn(2, 40, Hkv, bs, D, generator=g).to(device)
    perm = torch.randperm(40, generator=g).tolist()
    tables, start = [], 0
    for ctx, n in shapes:
        nb = -(-(ctx + n) // bs)
        tables.append(perm[start:start + nb])
        start += nb
    total = sum(n for _, n in shapes)
    q = torch.randn(total, H, D, generator=g).to(device)
    k, v = (torch.randn(total, Hkv, D, generator=g).to(device) for _ in range(2))

    def metadata():
        slots, prefills, row = [], [], 0
        for (ctx, n), table in zip(shapes, tables):
            slots += [table[p // bs] * bs + p % bs for p in range(ctx, ctx + n)]
            if n > 1:
                prefills.append(PrefillSeq(row, n, ctx, torch.tensor(
                    [table[p // bs] * bs + p % bs for p in range(ctx + n)], device=device)))
            row += n
        decodes = [(c + n, t) for (c, n), t in zip(shapes, tables) if n == 1]
        width = max(len(t) for _, t in decodes)
        return AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), block_size=bs,
                                 num_decode_tokens=len(decodes), prefills=prefills,
                                 decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for _, t in decodes],
                                                                  device=device),
                                 decode_seq_lens=torch.tensor([n for n, _ in decodes], device=device))

    for window, softcap in ((None, None), (5, None), (None, 1.5)):
        ref_cache, flash_cache = cache.clone(), cache.clone()
        ref = TorchAttentionBackend().forward(q, k, v, ref_cache, metadata(), D ** -0.5, window, softcap)
        out = flash_backend.FlashAttentionBackend().forward(q, k, v, flash_cache, metadata(), D ** -0.5, window,
                                                            softcap)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flash_cache, ref_cache)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim, block_size", [(2, 64, 16), (3, 40, 5)])
def test_cpu_kv_store_writes_what_the_torch_backend_writes(num_kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(3)
    num_heads, tokens = 2 * num_kv_heads, 11
    # k and v as the attention layer has them: strided views of one QKV projection output
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    k, v = k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim)
    slots = torch.randperm(8 * block_size, generator=g)[:tokens]
    meta = AttentionMetadata(slot_mapping=slots, block_size=block_size)
    caches = [torch.zeros(2, 8, num_kv_heads, block_size, head_dim, dtype=dtype) for _ in range(2)]
    TorchAttentionBackend().store_kv(k, v, caches[0], meta)
    cpu_backend.CpuPagedAttentionBackend().store_kv(k, v, caches[1], meta)
    assert torch.equal(caches[0], caches[1]) and caches[1].count_nonzero() > 0
    # a padding row (slot -1) is written nowhere
    padded = AttentionMetadata(slot_mapping=torch.full((tokens,), -1), block_size=block_size)
    before = caches[1].clone()
    cpu_backend.CpuPagedAttentionBackend().store_kv(k + 1, v + 1, caches[1], padded)
    assert torch.equal(caches[1], before)
