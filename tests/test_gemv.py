"""The few-row GEMV kernel (layers/gemv.py) against the layers it stands in for: RMSNorm (with the residual
add), the projection, SwiGLU / tanh GeGLU, computed by torch. On a CPU in Triton's interpreter; on a GPU
compiled. Then a whole model's decode steps through it against the same model without it."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.layers import gemv
from shardserve.layers.activation import GeluAndMul, SiluAndMul
from shardserve.layers.attention import triton_backend
from shardserve.layers.layernorm import RMSNorm

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.fixture(autouse=True)
def gemv_on(monkeypatch):
    monkeypatch.setattr(gemv, "ENABLED", True)


def _torch_path(monkeypatch):
    """The unfused layers' torch expressions, on any device."""
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "0")
    monkeypatch.setattr(gemv, "ENABLED", False)


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _case(rows, features, inner, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(rows, inner, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (torch.randn(features, inner, generator=g) / inner ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(features, generator=g).to(DEVICE, dtype)
    norm = RMSNorm(inner, eps=1e-6).to(DEVICE, dtype)
    norm.weight.copy_(1 + 0.1 * torch.randn(inner, generator=g))
    return x, residual, weight, bias, norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("features, inner", [(40, 100), (64, 256), (3, 1000)])  # partial tiles both ways
@pytest.mark.parametrize("with_bias", [False, True])
def test_plain_product_matches_f_linear(dtype, rows, features, inner, with_bias, monkeypatch):
    x, _, weight, bias, _ = _case(rows, features, inner, dtype)
    bias = bias if with_bias else None
    # as an attention output is: rows strided past other columns
    x = torch.cat([x, torch.zeros_like(x[:, :7])], 1)[:, :inner]
    assert gemv.runs(x, weight)
    out = gemv.linear(x, weight, bias)
    ref = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(dtype)
    torch.testing.assert_close(out, ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("first_layer", [False, True])
@pytest.mark.parametrize("act_name", [None, "silu", "tanh-gelu"])
@pytest.mark.parametrize("features, inner", [(48, 64), (20, 300)])
def test_norm_prologue_and_gated_epilogue_match_the_layers(dtype, rows, first_layer, act_name, features, inner,
                                                          monkeypatch):
    gated = act_name is not None
    x, residual, weight, bias, norm = _case(rows, 2 * features if gated else features, inner, dtype, seed=1)
    residual = None if first_layer else residual
    act = {None: None, "silu": SiluAndMul(), "tanh-gelu": GeluAndMul("tanh")}[act_name]
    assert gemv.fuses(norm, act)
    out, new_residual = gemv.gemv(x, weight, None, (norm.weight, norm.eps), residual, gated=gated,
                                  tanh_gelu=act_name == "tanh-gelu")
    _torch_path(monkeypatch)
    normed, ref_residual = norm(x, residual) if residual is not None else (norm(x), x)
    ref = F.linear(normed.float(), weight.float()).to(dtype)
    ref = act(ref) if gated else ref
    assert out.shape == (rows, features)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    assert torch.equal(new_residual, ref_residual)  # the sum in the model dtype, as RMSNorm's: same bits
    # through the layer's own entry point (a merged gate/up projection where gated), as the model calls it
    from shardserve.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
    monkeypatch.setattr(gemv, "ENABLED", True)
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "1")
    layer = (MergedColumnParallelLinear(inner, [features, features], bias=True) if gated
             else ReplicatedLinear(inner, features, bias=True)).to(DEVICE, dtype)
    layer.weight.copy_(weight)
    layer.bias.copy_(bias)
    fused, fused_residual = layer.normed_forward(norm, x, residual, act)
    _torch_path(monkeypatch)
    unfused, _ = layer.normed_forward(norm, x, residual, act)
    torch.testing.assert_close(fused, unfused, **_tol(dtype))
    assert torch.equal(fused_residual, ref_residual)


def test_only_a_few_rows_take_it(monkeypatch):
    x, _, weight, _, norm = _case(gemv.MAX_ROWS + 1, 8, 16, torch.float32)
    assert gemv.runs(x[:gemv.MAX_ROWS], weight) and not gemv.runs(x, weight)
    assert not gemv.runs(x[:1], weight.t().contiguous().t())  # a transposed view: F.linear's
    assert gemv.fuses(norm, SiluAndMul()) and not gemv.fuses(torch.nn.LayerNorm(16), None)
    assert not gemv.fuses(norm, GeluAndMul("none"))  # exact (erf) GELU: the unfused path
    monkeypatch.setattr(gemv, "ENABLED", False)
    assert not gemv.runs(x[:1], weight)


# q/k norm; QKV bias with tied embeddings; Gemma 3's sandwich norms and tanh GeGLU. On a GPU, test_gpu.py's bf16
# parity with transformers and CUDA graphs against eager run the models through it (a lent GPU's minutes are few).
@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU only (Triton's interpreter): on a GPU the kernel's model "
                                                  "path is tested by tests/test_gpu.py's bf16 parity with transformers "
                                                  "and CUDA graphs against eager, within a lent GPU's few minutes")
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "gemma3"])
def test_decode_steps_through_it_give_the_same_tokens(arch, model_dirs, monkeypatch):
    """Prefills take the usual GEMMs, decode steps of up to MAX_ROWS requests the kernel (every projection, the
    norms and the gated activation inside them, the LM head): the same greedy tokens, log-probabilities equal to
    fp32 noise."""
    prompts = [TokensPrompt(prompt_token_ids=list(range(5 + 7 * i, 17 + 9 * i))) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    calls = []
    kernel = gemv._gemv_kernel
    monkeypatch.setattr(gemv, "_gemv_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), kernel[grid])[1]})())
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(gemv, "ENABLED", on)
        llm = LLM(model_dirs(arch), dtype="float32", attention_backend="torch")
        outs[on] = llm.generate(prompts, params, use_tqdm=False)
        if on:
            assert calls, "no decode step went through the GEMV kernel"
            calls.clear()
        del llm
        gc.collect()
    assert not calls
    for fused, plain in zip(outs[True], outs[False]):
        a, b = fused.outputs[0], plain.outputs[0]
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            for token, lp in lp_b.items():
                assert lp_a[token].logprob == pytest.approx(lp.logprob, abs=1e-4)


def test_an_adapted_layer_keeps_its_adapter(monkeypatch):
    """A LoRA adapter's product is added to the kernel's plain product; a normed projection with an adapter takes
    the unfused path (the adapter reads the normed rows, which the kernel never writes)."""
    from shardserve.layers.linear import ReplicatedLinear
    from shardserve.lora.layers import LoRAWeights, active_loras
    x, residual, weight, _, norm = _case(2, 24, 40, torch.float32, seed=3)
    layer = ReplicatedLinear(40, 24).to(DEVICE)
    layer.weight.copy_(weight)
    g = torch.Generator().manual_seed(4)
    adapter = LoRAWeights(torch.randn(4, 40, generator=g).to(DEVICE), torch.randn(24, 4, generator=g).to(DEVICE))
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(gemv, "ENABLED", on)
        with active_loras({layer: adapter}):
            outs[on] = layer(x), layer.normed_forward(norm, x, residual)[0]
    assert not torch.allclose(outs[False][0], F.linear(x, weight))  # the adapter changes the output
    for fused, plain in zip(outs[True], outs[False]):
        torch.testing.assert_close(fused, plain, **_tol(torch.float32))
