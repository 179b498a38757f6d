"""Linear layers that name their tensor parallelism; each slices its rank's shard out of a checkpoint tensor.

Column-parallel layers split the output features across ranks, row-parallel layers split the input
features and all-reduce the partial sums. With TP=1 they are plain linears.
"""
from __future__ import annotations

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from shardserve.layers import gemv
from shardserve.layers.cpu_gemm import PackedWeight
from shardserve.lora.layers import active_lora, add_lora


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}.")
    return numerator // denominator


def check_tensor_parallel_sizes(hf_config, tp_size: int) -> None:
    """Refuse, before any worker starts, a model whose heads or MLPs cannot be split `tp_size` ways."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    mlp = (getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "ffn_dim", None)
           or getattr(hf_config, "n_inner", None) or 4 * hf_config.hidden_size)
    divide(heads, tp_size)
    divide(mlp, tp_size)
    for moe in ("moe_intermediate_size", "shared_expert_intermediate_size"):  # each expert's MLP splits too
        if getattr(hf_config, moe, None):
            divide(getattr(hf_config, moe), tp_size)
    if kv_heads >= tp_size:
        divide(kv_heads, tp_size)
    elif tp_size % kv_heads:
        raise ValueError(f"The tensor-parallel size {tp_size} is not a multiple of the model's {kv_heads} KV heads.")


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_dim = get_tp_rank(), get_tp_size(), tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: PackedWeight | None = None  # set by cpu_gemm.prepack_model once weights are loaded

    def shard(self, loaded: torch.Tensor, shard_id=None) -> tuple[int, torch.Tensor]:
        """This rank's part of a checkpoint tensor of the layer (of its projection `shard_id`, where it stores
        several), and where that part starts along the layer's output features."""
        if self.tp_dim is not None and self.tp_size > 1 and loaded.dim() > self.tp_dim:
            size = self.weight.size(self.tp_dim)
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        return 0, loaded

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset, part = self.shard(loaded, shard_id)
        (param if shard_id is None else param.narrow(0, offset, part.size(0))).copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_lora(self, x, gemv.linear(x, self.weight, self.bias, self.packed))

    def normed_forward(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                       act: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step that opens a pre-norm block: this layer (then `act`) applied to norm(x + residual), and
        x + residual, the next residual (norm(x) and x at the first layer, where `residual` is None). At a decode
        step's few rows on a GPU one kernel reads the weight once and computes the norm and a gated `act` (SwiGLU,
        tanh GeGLU) on the way (layers/gemv.py)."""
        if gemv.runs(x, self.weight) and gemv.fuses(norm, act) and active_lora(self) is None:
            return gemv.gemv(x, self.weight, self.bias, (norm.weight, norm.eps), residual, gated=act is not None,
                             tanh_gelu=getattr(act, "approximate", None) == "tanh")
        x, residual = norm(x, residual) if residual is not None else (norm(x), x)
        y = self(x)
        return (y if act is None else act(y)), residual


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, get_tp_size()), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def shard(self, loaded: torch.Tensor, shard_id: int) -> tuple[int, torch.Tensor]:
        tp = self.tp_size
        size = self.output_sizes[shard_id] // tp
        return sum(self.output_sizes[:shard_id]) // tp, loaded.narrow(0, self.tp_rank * size, size)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix. KV heads are split across ranks, or replicated when there
    are fewer KV heads than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, tp)
        if total_num_kv_heads >= tp:
            self.num_kv_heads = divide(total_num_kv_heads, tp)
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, total_num_kv_heads)
        output = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, output, bias)

    def shard(self, loaded: torch.Tensor, shard_id: str) -> tuple[int, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size, rank = {"q": (0, q_size, self.tp_rank),
                              "k": (q_size, kv_size, self.tp_rank // self.kv_replicas),
                              "v": (q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas)}[shard_id]
        return offset, loaded.narrow(0, rank * size, size)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, get_tp_size()), output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the partial products are summed; so are the adapters' (partial) products.
        y = gemv.linear(x, self.weight, self.bias if self.tp_rank == 0 else None, self.packed)
        return tp_all_reduce(add_lora(self, x, y))
