"""Every Triton kernel compiled ahead of time for a Hopper GPU (sm_90, the H100/H200) at the real shapes of
the GPU issue's models, on a machine without one.

The interpreter tests check what the kernels compute; only Triton's compiler (down to ptxas, which the
triton wheel ships) says whether they lower at all for the GPU, with the tile sizes the wrappers choose
there, and how much shared memory each launch asks for: a launch past the chip's limit fails at run time.
The wrappers are called as the engine calls them, with their launches recorded instead of run, in a child
process without TRITON_INTERPRET (under it `triton.jit` gives interpreter functions, which don't compile).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from shardserve.layers.attention import triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.available(),
                                reason="needs triton (the test extra installs it on Linux x86-64)")

# (name, hidden size, query heads, KV heads, head dim, intermediate size): the GPU issue's benchmark models.
MODELS = [("qwen3-0.6b", 1024, 16, 8, 128, 3072), ("llama-3.2-1b", 2048, 32, 8, 64, 8192)]
DTYPES = ["bfloat16", "float32"]
ARCH = 90
# The most shared memory one block of an sm_90 kernel may ask for (227 KiB, CUDA's opt-in maximum).
MAX_SHARED_BYTES = 227 * 1024


def _launches(hidden, num_heads, num_kv_heads, head_dim, inter, dtype, block_size=16):
    """Calls each kernel wrapper the way the engine does for this model; yields (what, launches)."""
    import torch
    import triton

    from shardserve.layers import fused_kernels, gemv
    from shardserve.layers.attention import triton_kernels

    dtype = getattr(torch, dtype)
    recorded = []

    def recorder(kernel):  # stands in for JITFunction.run, which `kernel[grid](...)` calls
        return lambda *args, grid, warmup, **kwargs: recorded.append((kernel, args, kwargs))

    for module in (triton_kernels, fused_kernels, gemv):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.JITFunction):
                value.run = recorder(value)
    fused_kernels._use_c = lambda x: False  # fp32 on a CPU would take the C kernels

    def take(what, call):
        recorded.clear()
        call()
        return what, list(recorded)

    blocks = 64
    cache = torch.zeros(2, blocks, num_kv_heads, block_size, head_dim, dtype=dtype)
    scale = head_dim ** -0.5

    def decode(batch, context):
        width = -(-context // block_size)
        q = torch.zeros(batch, num_heads, head_dim, dtype=dtype)
        tables = torch.zeros(batch, width, dtype=torch.long)  # as the model runner and CUDA graphs hold them
        lens = torch.full((batch,), context, dtype=torch.long)
        return lambda: triton_kernels.paged_decode(q, cache, tables, lens, scale)

    def prefill(seqs, query_len):
        q = torch.zeros(seqs * query_len, num_heads, head_dim, dtype=dtype)
        tables = torch.zeros(seqs, -(-query_len // block_size), dtype=torch.long)
        starts = torch.arange(seqs) * query_len
        lens, contexts = torch.full((seqs,), query_len), torch.zeros(seqs, dtype=torch.long)
        return lambda: triton_kernels.paged_prefill(q, cache, tables, starts, lens, contexts, query_len, scale,
                                                    torch.empty_like(q))

    qkv = torch.zeros(256, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = q.view(256, num_heads, head_dim), k.view(256, -1, head_dim), v.view(256, -1, head_dim)
    cos_sin = torch.zeros(256, 1, head_dim // 2, dtype=dtype)
    x, weight = torch.zeros(256, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype)
    yield take("store_kv", lambda: triton_kernels.store_kv(k, v, cache, torch.zeros(256, dtype=torch.long)))
    yield take("decode, 256 sequences of 256 tokens", decode(256, 256))
    yield take("decode, 1 sequence of 2,048 tokens (split)", decode(1, 2048))
    yield take("decode, 1 sequence of 32,768 tokens (most splits)", decode(1, 32768))
    yield take("prefill, 8 sequences of 128 tokens", prefill(8, 128))
    yield take("rms_norm", lambda: fused_kernels.rms_norm(x, weight, 1e-6))
    yield take("rms_norm with residual", lambda: fused_kernels.rms_norm(x, weight, 1e-6, x))
    yield take("rms_norm over heads (q/k norm)",
               lambda: fused_kernels.rms_norm(x[:, :head_dim], weight[:head_dim], 1e-6))
    yield take("SwiGLU and tanh GeGLU", lambda: (fused_kernels.act_and_mul(torch.zeros(256, 2 * inter, dtype=dtype)),
                                                 fused_kernels.act_and_mul(torch.zeros(4, 2 * inter, dtype=dtype),
                                                                           tanh_gelu=True)))
    yield take("rotary", lambda: fused_kernels.rotary_(q, k, cos_sin, cos_sin))
    yield take("rotary with q/k norm and the KV store", lambda: fused_kernels.rotary_(
        q, k, cos_sin, cos_sin, (weight[:head_dim], weight[:head_dim]), 1e-6,
        (v, cache, torch.zeros(256, dtype=torch.long))))
    # a decode step's projections at 1 and at gemv.MAX_ROWS rows
    qkv_weight = torch.zeros(qkv.shape[1], hidden, dtype=dtype)
    # (with programmatic dependent launch, as on a Hopper GPU, and without)
    yield take("gemv: residual + RMSNorm + QKV, 1 row, PDL", lambda: gemv.gemv(
        x[:1], qkv_weight, None, (weight, 1e-6), x[1:2], use_pdl=True))
    yield take("gemv: residual + RMSNorm + gate_up + SwiGLU, most rows, PDL", lambda: gemv.gemv(
        x[:gemv.MAX_ROWS], torch.zeros(2 * inter, hidden, dtype=dtype), None, (weight, 1e-6), x[:gemv.MAX_ROWS],
        gated=True, use_pdl=True))
    yield take("gemv: down, 1 row", lambda: gemv.gemv(torch.zeros(1, inter, dtype=dtype),
                                                      torch.zeros(hidden, inter, dtype=dtype), use_pdl=False))
    gemv.pdl = lambda device: True  # decode attention letting the output projection's GEMV start early
    yield take("decode, 1 sequence of 2,048 tokens (split), starting the next kernel early", decode(1, 2048))


def _signature(kernel, args, kwargs):
    """Triton's signature, constexprs and specialisation attributes for one recorded launch (args by position,
    then keywords). The attributes are what a launch on the GPU adds: a pointer 16-byte aligned, an integer a
    multiple of 16 (unless the kernel says not to specialise on it) are marked divisible by 16, which is what lets
    Triton's coalescing give a thread 16-byte loads; without them the compiled code would not be the GPU's."""
    import torch

    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
             torch.int64: "i64"}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + types[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = divisible
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = divisible
        else:
            signature[param.name] = "fp32"
    return signature, constexprs, attrs


def _load_widths(ptx: str) -> dict[str, int]:
    """Global loads by kind: 16-byte ones, 2-byte ones, and the GEMV's weight loads (marked evict_first) and how
    many of those are 16 bytes wide; and the barriers inside loops (LLVM marks each loop's header in the PTX;
    a loop ends at its conditional branch back)."""
    loads = re.findall(r"ld\.global[.a-zA-Z0-9:_]*", ptx)
    weights = [load for load in loads if "evict_first" in load]
    loop_barriers, in_loop = 0, False
    for line in ptx.splitlines():
        in_loop = in_loop or "Loop Header" in line
        loop_barriers += in_loop and "bar.sync" in line
        in_loop = in_loop and not re.search(r"@%p\d+ bra\s", line)
    return {"wide_loads": sum(".v4." in load for load in loads),
            "2-byte_loads": sum(".b16" in load for load in loads),
            "weight_loads": len(weights), "wide_weight_loads": sum(".v4." in load for load in weights),
            "loop_barriers": loop_barriers}


def _compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for name, hidden, num_heads, num_kv_heads, head_dim, inter in MODELS:
        for dtype in DTYPES:
            for what, launches in _launches(hidden, num_heads, num_kv_heads, head_dim, inter, dtype):
                result = {"model": name, "dtype": dtype, "what": what, "kernels": []}
                results.append(result)
                for kernel, args, kwargs in launches:
                    signature, constexprs, attrs = _signature(kernel, args, kwargs)
                    try:
                        options = {k: kwargs[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
                        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                                  target=GPUTarget("cuda", ARCH, 32), options=options)
                        result["kernels"].append({"name": kernel.__name__, "shared": compiled.metadata.shared,
                                                  "num_warps": compiled.metadata.num_warps,
                                                  **_load_widths(compiled.asm["ptx"])})
                    except Exception as error:  # reported to the test, which fails on it
                        result["kernels"].append({"name": kernel.__name__, "error": f"{type(error).__name__}: "
                                                                                    f"{error}"[-2000:]})
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile, don't reuse
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said aloud (3.9 warns otherwise)
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-4000:]
    return {(r["model"], r["dtype"], r["what"]): r["kernels"] for r in map(json.loads, run.stdout.splitlines())}


@pytest.mark.parametrize("model", [m[0] for m in MODELS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_compile_for_hopper(compiled, model, dtype):
    cases = {what: kernels for (m, d, what), kernels in compiled.items() if (m, d) == (model, dtype)}
    assert len(cases) == 15, sorted(cases)
    for what, kernels in cases.items():
        assert kernels, f"{what}: launched no kernel"
        for kernel in kernels:
            assert "error" not in kernel, f"{what}: {kernel['name']} does not compile for sm_{ARCH}: {kernel['error']}"
            assert kernel["shared"] <= MAX_SHARED_BYTES, \
                f"{what}: {kernel['name']} asks for {kernel['shared']} bytes of shared memory"
    names = {kernel["name"] for kernels in cases.values() for kernel in kernels}
    assert {"_store_kv_kernel", "_paged_decode_kernel", "_paged_prefill_kernel",
            "_rms_norm_kernel", "_rotary_kernel", "_gemv_kernel", "_act_and_mul_kernel"} <= names
    # A batch-1 projection is bound by how fast it reads its weight, decode attention by its KV cache: each
    # thread's loads of them must be 16 bytes wide (a 3-D product in the GEMV made Triton load bf16 weights two
    # bytes at a time; so did every kernel compiled without a launch's specialisation).
    for what, kernels in cases.items():
        for kernel in kernels:
            if what.startswith("gemv"):
                assert kernel["weight_loads"] > 0 and kernel["wide_weight_loads"] == kernel["weight_loads"], \
                    (what, kernel)
            # A GEMV's loops hold no barrier: its products are reduced after the loop, and every tensor in it
            # has their layout, so none is converted through shared memory (layers/gemv.py)
            if what.startswith("gemv"):
                assert kernel["loop_barriers"] == 0, (what, kernel)
            if what.startswith("decode"):
                assert kernel["wide_loads"] > 0 and kernel["2-byte_loads"] == 0, (what, kernel)


if __name__ == "__main__":
    for line in _compile_all():
        print(json.dumps(line), flush=True)
