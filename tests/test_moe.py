"""The mixture-of-experts layer against each token run through its own experts one at a time. Whole models
(Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers are in test_generate_parity.py (ARCHS), and split over
tensor and pipeline ranks in test_ray_executor.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve import LLM
from shardserve.layers import fused_moe
from shardserve.layers.fused_moe import FusedMoE, select_experts

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("top_k, renormalize", [(2, True), (3, False), (1, False)])
def test_experts_match_each_token_through_its_own_experts(device, dtype, tol, grouped, top_k, renormalize,
                                                          monkeypatch):
    """8 experts and 5 tokens: some experts get several tokens, some none. Both ways of running the experts'
    GEMMs (one grouped GEMM, one GEMM per expert) give what running each token alone gives."""
    if grouped and (device != "cpu" or not hasattr(torch, "_grouped_mm")):
        pytest.skip("the grouped GEMM is taken on CPUs, where torch has it")
    monkeypatch.setattr(fused_moe, "_use_grouped_mm", lambda x: grouped)
    moe, checkpoint = _experts(8, top_k, 32, 16, renormalize, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g).to(dtype=dtype, device=device)
    router_logits = (torch.randn(5, 8, generator=g) * 3).to(dtype=dtype, device=device)
    expected = _one_token_at_a_time(x, router_logits, checkpoint, top_k, renormalize)
    out = moe(x, router_logits)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


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
