"""Mixture-of-experts MLP: a router picks each token's top-k experts, and the token's output is their
gated MLPs' outputs, weighted by the router's probabilities.

The experts' weights are stacked: `w13` [E, 2 * I, H] (each expert's gate and up projections, one above the
other) and `w2` [E, H, I]. Tensor parallelism splits every expert's intermediate size I, as a column- then
row-parallel MLP does, and the partial outputs are all-reduced once for all experts.

A step's (token, expert) pairs are sorted by expert, so each expert's tokens are one contiguous run of rows:
both projections are then one grouped GEMM over those runs instead of a pass per token: the package's C kernel
on CPUs (csrc/moe_gemm.c, fp32 or bf16 weights packed for it once loaded), torch's grouped GEMM on CPUs in
other dtypes, else a GEMM per expert that has tokens (`gemm_path`).

LoRA adapters of the experts (lora/adapter.py) add each expert's low-rank pair to both projections the same way:
`(rows A_e^T) B_e^T` over each expert's run of rows, two more grouped GEMMs a projection, with the step's other
adapters' columns masked off each row as lora/layers.py does for linear layers. Where the experts run in the C
kernel, so do their adapters, packed for it on first use (a decode step's experts have a row or two each: a
torch GEMM per expert costs more in calls than in arithmetic).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from shardserve.layers import cpu_kernels
from shardserve.layers.activation import SiluAndMul
from shardserve.layers.linear import divide
from shardserve.lora.layers import LoRAWeights, active_lora


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts and their weights (fp32): the softmax over all experts, taken at the top k,
    rescaled to sum to 1 where `renormalize` (Mixtral; Qwen MoEs with norm_topk_prob)."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


PACK_LANES = 16  # output columns per block of a packed weight (csrc/moe_gemm.c's LANES)
C_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # of the weights; the kernel computes in fp32


def pack_for_c_kernel(w: torch.Tensor) -> torch.Tensor:
    """[E, n, k] -> [E, ceil(n / 16), k, 16]: each block of 16 output columns with its k rows of 16 weights
    one after another, the order the C kernel streams them in (zero columns pad the last block)."""
    experts, n, k = w.shape
    blocks = -(-n // PACK_LANES)
    padded = torch.nn.functional.pad(w, (0, 0, 0, blocks * PACK_LANES - n))
    return padded.view(experts, blocks, PACK_LANES, k).transpose(2, 3).contiguous()


# id of an adapter's stacked pairs (A or B, [E, n, k]) -> the same packed for the C kernel, while they live
# (by id: tensors compare elementwise, so they cannot be weak dictionary keys)
_PACKED_LORA: dict[int, torch.Tensor] = {}


def _packed_lora(w: torch.Tensor) -> torch.Tensor:
    packed = _PACKED_LORA.get(id(w))
    if packed is None:
        packed = _PACKED_LORA[id(w)] = pack_for_c_kernel(w)
        weakref.finalize(w, _PACKED_LORA.pop, id(w), None)
    return packed


def gemm_path(x: torch.Tensor, *sizes: int) -> str:
    """How unpacked experts' GEMMs from rows `x` through matrices of `sizes` run: "grouped" (torch._grouped_mm,
    on CPUs: a GPU's grouped GEMM has its own dtype and alignment rules, untested here) or "loop" (a GEMM per
    expert with rows: GPUs, torch without a grouped GEMM, and rows not 16-byte aligned, which the grouped GEMM
    refuses)."""
    aligned = all(size * x.element_size() % 16 == 0 for size in (x.size(-1), *sizes))
    return "grouped" if x.device.type == "cpu" and aligned and hasattr(torch, "_grouped_mm") else "loop"


def _grouped_gemm(path: str, x: torch.Tensor, w: torch.Tensor, n: int, ends: torch.Tensor,
                  counts: list[int] | None) -> torch.Tensor:
    """Rows x[ends[e-1]:ends[e]] times w[e]^T ([n, k], or packed for the "c" path) for every expert e, x's rows
    in expert order."""
    if path == "grouped":
        return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    if path == "c":  # fp32 rows in and out, the weights fp32 or bf16
        out = torch.empty(x.size(0), n)
        cpu_kernels.lib().moe_grouped_gemm(x.data_ptr(), w.data_ptr(), ends.data_ptr(), out.data_ptr(), w.size(0),
                                           n, x.size(1), int(w.dtype == torch.bfloat16), torch.get_num_threads())
        return out
    out = x.new_empty(x.size(0), n)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.matmul(x[start:start + count], w[expert].t(), out=out[start:start + count])
            start += count
    return out


class FusedMoE(nn.Module):
    """The experts of one layer, taking the tokens and the router's logits for them."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 act: nn.Module | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size = hidden_size
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.intermediate = divide(intermediate_size, self.tp_size)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        for param in (self.w13, self.w2):
            param.weight_loader = self.weight_loader
        self.act = act or SiluAndMul()
        self.packed_for_c = False  # weights in the C kernel's layout (pack_for_cpu)

    def pack_for_cpu(self) -> bool:
        """Once loaded: on a CPU in fp32 or bf16, rewrite the weights in place into the C kernel's layout, which
        then runs every step (no copy is kept: the experts are most of the model). Returns whether it did."""
        if self.packed_for_c or self.w13.device.type != "cpu" or self.w13.dtype not in C_KERNEL_DTYPES \
                or not cpu_kernels.available():
            return False
        for param in (self.w13, self.w2):
            param.data = pack_for_c_kernel(param.data)
        self.packed_for_c = True
        return True

    def shard(self, loaded: torch.Tensor, projection: str) -> tuple[int, torch.Tensor]:
        """This rank's slice of an expert's projection ("gate", "up": rows; "down": columns of the intermediate
        size), and the row of its stacked matrix where the slice starts."""
        size, start = self.intermediate, self.tp_rank * self.intermediate
        if projection == "down":
            return 0, loaded.narrow(1, start, size)
        return 0 if projection == "gate" else size, loaded.narrow(0, start, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """One expert's projection from a checkpoint ("gate", "up" or "down"), this rank's slice of it."""
        expert, projection = shard_id
        offset, part = self.shard(loaded, projection)
        if self.packed_for_c:  # a weight update after packing: row r is lane r % 16 of block r // 16
            rows = torch.arange(offset, offset + part.size(0))
            param[expert][rows // PACK_LANES, :, rows % PACK_LANES] = part.to(param.dtype)
        else:
            param[expert].narrow(0, offset, part.size(0)).copy_(part)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = self._forward_packed(x, router_logits) if self.packed_for_c else self._forward_torch(x, router_logits)
        return tp_all_reduce(out)

    def _forward_packed(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The C kernels end to end, in fp32: routing (csrc/moe_gemm.c's moe_route), the two grouped GEMMs on
        the packed weights, and the weighted sum of each token's experts."""
        lib, threads = cpu_kernels.lib(), torch.get_num_threads()
        tokens, pairs = x.size(0), x.size(0) * self.top_k
        logits = router_logits.float().contiguous()
        pair_token = torch.empty(pairs, dtype=torch.int64)
        pair_weight = torch.empty(pairs)
        ends = torch.empty(self.num_experts, dtype=torch.int32)
        lib.moe_route(logits.data_ptr(), tokens, self.num_experts, self.top_k, int(self.renormalize),
                      pair_token.data_ptr(), pair_weight.data_ptr(), ends.data_ptr())
        rows = x.float().index_select(0, pair_token)
        h = _grouped_gemm("c", rows, self.w13, 2 * self.intermediate, ends, None)
        h = self._add_lora("w13", rows, h, pair_token, ends, None)
        g = self.act(h)
        y = _grouped_gemm("c", g, self.w2, self.hidden_size, ends, None)
        y = self._add_lora("w2", g, y, pair_token, ends, None)
        out = torch.zeros(tokens, self.hidden_size)
        lib.moe_combine(y.data_ptr(), pair_token.data_ptr(), pair_weight.data_ptr(), out.data_ptr(), pairs,
                        self.hidden_size, threads)
        return out.to(x.dtype)

    def _forward_torch(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        # (token, expert) pairs in expert order; a stable sort keeps each expert's tokens in step order.
        expert_of_pair = ids.flatten()
        order = expert_of_pair.argsort(stable=True)
        token_of_pair = order // self.top_k
        counts = torch.bincount(expert_of_pair, minlength=self.num_experts)
        ends = counts.cumsum(0).to(torch.int32)
        path = gemm_path(x, self.intermediate)
        per_expert = counts.tolist() if path == "loop" else None
        rows = x[token_of_pair]
        h = _grouped_gemm(path, rows, self.w13, 2 * self.intermediate, ends, per_expert)
        h = self._add_lora("w13", rows, h, token_of_pair, ends, per_expert)
        g = self.act(h)
        y = _grouped_gemm(path, g, self.w2, self.hidden_size, ends, per_expert)
        y = self._add_lora("w2", g, y, token_of_pair, ends, per_expert)
        # weighted in fp32, as the router's probabilities are, then summed over each token's experts
        y = (y.float() * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_pair, y)

    def _add_lora(self, param: str, rows: torch.Tensor, out: torch.Tensor, token_of_row: torch.Tensor,
                  ends: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
        """`out` (rows, in expert order, times `param`'s experts) with the pass's adapters of those experts
        added in place; `token_of_row`: each row's token, whose adapter's columns its row keeps; `counts`: the
        rows of each expert where the caller has them on the host."""
        lora: LoRAWeights | None = active_lora((self, param))
        if lora is None:
            return out
        if self.packed_for_c:  # fp32 rows, the adapter's weights in the model's dtype, as the experts'
            a, b, path = _packed_lora(lora.a), _packed_lora(lora.b), "c"
        else:
            a, b, path = lora.a, lora.b, gemm_path(rows, lora.a.size(1), lora.b.size(1))
        if path == "loop" and counts is None:
            counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        xa = _grouped_gemm(path, rows, a, lora.a.size(1), ends, counts)
        if lora.mask is not None:
            xa.mul_(lora.mask.index_select(0, token_of_row))
        return out.add_(_grouped_gemm(path, xa, b, lora.b.size(1), ends, counts))
