"""The mixture-of-experts layer against each token run through its own experts one at a time. Whole models
(Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers are in test_generate_parity.py (ARCHS), and split over
tensor and pipeline ranks in test_ray_executor.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardserve import LLM
from shardserve.layers import cpu_kernels, fused_moe
from shardserve.layers.cpu_gemm import prepack_model
from shardserve.layers.fused_moe import FusedMoE, select_experts
from shardserve.lora.layers import LoRAWeights, active_loras, stack_loras, step_loras

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _experts(num_experts, top_k, hidden, inter, renormalize, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    moe = FusedMoE(num_experts, top_k, hidden, inter, renormalize).to(dtype=dtype, device=device)
    checkpoint = {}
    for e in range(num_experts):
        for name, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            checkpoint[e, name] = torch.randn(shape, generator=g).to(dtype) / hidden ** 0.5
            param = moe.w2 if name == "down" else moe.w13
            moe.weight_loader(param, checkpoint[e, name].to(device), (e, name))
    return moe, checkpoint


def _one_token_at_a_time(x, router_logits, checkpoint, top_k, renormalize):
    probs = router_logits.float().softmax(-1)
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.size(0)):
        weights, ids = probs[t].topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), ids.tolist()):
            gate, up, down = (checkpoint[e, n].float().to(x.device) for n in ("gate", "up", "down"))
            out[t] += w * (F.silu(x[t].float() @ gate.T) * (x[t].float() @ up.T)) @ down.T
    return out


def _paths(device, dtype, hidden, inter):
    """The GEMM paths this case can take: the CPU's C kernel (fp32 and bf16) where the C library builds (it does
    in CI), torch's grouped GEMM on CPUs for 16-byte aligned rows (torch has had it since 2.8), a GEMM per expert
    anywhere."""
    if device != "cpu":
        return ["loop"]
    aligned = all(d * torch.finfo(dtype).bits // 8 % 16 == 0 for d in (hidden, inter))
    return ["loop"] + (["grouped"] if aligned and hasattr(torch, "_grouped_mm") else []) + \
        (["c"] if dtype in fused_moe.C_KERNEL_DTYPES and cpu_kernels.available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("top_k, renormalize", [(2, True), (3, False), (1, False)])
@pytest.mark.parametrize("hidden, inter, tokens", [(32, 16, 5), (30, 13, 5), (32, 16, 40)])
def test_experts_match_each_token_through_its_own_experts(device, dtype, tol, top_k, renormalize, hidden, inter,
                                                          tokens):
    """8 experts: with 5 tokens some get several tokens and some none, with 40 most get more than the C
    kernel's 8 rows at once; (30, 13): sizes no vector width or block of columns divides. Every way of running
    the experts' GEMMs (the C kernel on packed weights, torch's grouped GEMM, a GEMM per expert) gives what
    running each token alone gives."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype=dtype, device=device)
    router_logits = (torch.randn(tokens, 8, generator=g) * 3).to(dtype=dtype, device=device)
    paths = _paths(device, dtype, hidden, inter)
    for path in paths:
        moe, checkpoint = _experts(8, top_k, hidden, inter, renormalize, dtype, device)
        expected = _one_token_at_a_time(x, router_logits, checkpoint, top_k, renormalize)
        if path == "c":
            assert moe.pack_for_cpu()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_moe, "gemm_path", lambda *args, path=path: path)
            out = moe(x, router_logits)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_experts_adapters_match_each_token_through_its_adapters_merged_experts(device, dtype, tol):
    """Two adapters of the experts (ranks 6 and 2; the second leaves expert 5 alone) and tokens of neither in one
    pass: every GEMM path gives each token what its experts with its adapter merged into their weights
    (W_e + B_e A_e) give it alone."""
    hidden, inter, tokens, num_experts, top_k = 32, 16, 12, 8, 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=g).to(dtype=dtype, device=device)
    router_logits = (torch.randn(tokens, num_experts, generator=g) * 3).to(dtype=dtype, device=device)
    owner = torch.tensor([0, 1, -1] * 4, dtype=torch.int32, device=device)  # each token's adapter, -1 none
    adapters = []  # per adapter: {projection: (A, B)}, A (experts, rank, in), B (experts, out, rank)
    for rank in (6, 2):
        pair = {"w13": (torch.randn(num_experts, rank, hidden, generator=g) / hidden ** 0.5,
                        torch.randn(num_experts, 2 * inter, rank, generator=g) / rank ** 0.5),
                "w2": (torch.randn(num_experts, rank, inter, generator=g) / inter ** 0.5,
                       torch.randn(num_experts, hidden, rank, generator=g) / rank ** 0.5)}
        if rank == 2:
            for a, b in pair.values():
                b[5] = 0
        adapters.append({k: (a.to(dtype).float(), b.to(dtype).float()) for k, (a, b) in pair.items()})
    for path in _paths(device, dtype, hidden, inter):
        moe, checkpoint = _experts(num_experts, top_k, hidden, inter, True, dtype, device)
        expected = torch.empty(tokens, hidden)
        for t in range(tokens):
            merged = dict(checkpoint)
            if owner[t] >= 0:
                (a13, b13), (a2, b2) = (adapters[owner[t]][k] for k in ("w13", "w2"))
                for e in range(num_experts):
                    delta13 = b13[e] @ a13[e]
                    merged[e, "gate"] = checkpoint[e, "gate"].float() + delta13[:inter]
                    merged[e, "up"] = checkpoint[e, "up"].float() + delta13[inter:]
                    merged[e, "down"] = checkpoint[e, "down"].float() + b2[e] @ a2[e]
            expected[t] = _one_token_at_a_time(x[t:t + 1], router_logits[t:t + 1], merged, top_k, True)[0].cpu()
        stacked = stack_loras([{(moe, k): LoRAWeights(a.to(device, dtype), b.to(device, dtype))
                                for k, (a, b) in adapter.items()} for adapter in adapters])
        if path == "c":
            assert moe.pack_for_cpu()
        with pytest.MonkeyPatch.context() as mp, active_loras(step_loras(stacked, owner)):
            if path == "loop":  # else the real choice: grouped for the 16-byte aligned sizes here (8 columns)
                mp.setattr(fused_moe, "gemm_path", lambda *args: "loop")
            out = moe(x, router_logits)
        torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol, msg=lambda m: f"{path}: {m}")


def test_the_c_kernel_takes_fp32_and_bf16_on_cpus_and_the_grouped_gemm_fp16():
    if not cpu_kernels.available():
        pytest.skip(f"the C kernels do not build here: {cpu_kernels.build_error()}")
    fp32, bf16, fp16 = (_experts(4, 2, 32, 16, True, dtype, "cpu")[0]
                        for dtype in (torch.float32, torch.bfloat16, torch.float16))
    assert prepack_model(nn.Sequential(fp32, bf16, fp16), batch_hint=16) == 0  # no linear layers: only experts
    for packed in (fp32, bf16):
        assert packed.packed_for_c and packed.w13.shape == (4, 2, 32, 16) and packed.w2.shape == (4, 2, 16, 16)
    assert not fp16.packed_for_c
    assert fused_moe.gemm_path(torch.zeros(1, 32, dtype=torch.float16), 16) == \
        ("grouped" if hasattr(torch, "_grouped_mm") else "loop")
    assert fused_moe.gemm_path(torch.zeros(1, 32, dtype=torch.float16), 12) == "loop"  # rows not 16-byte aligned


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernels")
@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, True), (8, True), (3, False)])
def test_c_routing_groups_pairs_as_torch_does(top_k, renormalize):
    """csrc's moe_route against select_experts and a stable argsort: the same experts, pairs in the same order,
    the same weights; 40 tokens over 16 experts (and 8 of 8: every expert chosen)."""
    num_experts = 8 if top_k == 8 else 16
    logits = torch.randn(40, num_experts, generator=torch.Generator().manual_seed(top_k)) * 2
    weights, ids = select_experts(logits, top_k, renormalize)
    order = ids.flatten().argsort(stable=True)
    pair_token, pair_weight = torch.empty(40 * top_k, dtype=torch.int64), torch.empty(40 * top_k)
    ends = torch.empty(num_experts, dtype=torch.int32)
    cpu_kernels.lib().moe_route(logits.data_ptr(), 40, num_experts, top_k, int(renormalize), pair_token.data_ptr(),
                                pair_weight.data_ptr(), ends.data_ptr())
    assert pair_token.tolist() == (order // top_k).tolist()
    assert ends.tolist() == torch.bincount(ids.flatten(), minlength=num_experts).cumsum(0).tolist()
    torch.testing.assert_close(pair_weight, weights.flatten()[order])


def test_select_experts_keeps_softmax_weights_unless_renormalised():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = logits.softmax(-1)
    weights, ids = select_experts(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, probs[:, [0, 2]])
    weights, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, [0, 2]] / probs[:, [0, 2]].sum())


def test_experts_that_cannot_be_split_are_refused_before_workers_start(model_dirs):
    """Experts of 30 intermediate features do not split 4 ways, where the heads and the dense MLP do."""
    path = model_dirs("qwen3_moe", moe_intermediate_size=30)
    with pytest.raises(ValueError, match="30 is not divisible by the tensor-parallel size 4"):
        LLM(path, tensor_parallel_size=4, distributed_executor_backend="ray")
