"""GPT-2 (Radford et al., 2019): pre-LayerNorm decoder with learned absolute positions.

x += Attn(LN(x)); x += MLP(LN(x)); LN at the end; the LM head is tied to the token embedding.
Tokens arrive flattened: [num_tokens, hidden]. HF stores GPT-2's projections as Conv1D, i.e. as
[in, out] matrices, and Q, K, V as one fused `c_attn`: the loader transposes and splits them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_pp_group
from shardserve.layers.activation import get_act_fn
from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.models.loader import load_params
from shardserve.models.pipeline import (IntermediateTensors, make_layers, on_first_stage, on_last_stage, tie_head,
                                         tied_head_weights)


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        self.head_dim = hidden // total_heads
        self.c_attn = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads, bias=True)
        self.q_size = self.c_attn.num_heads * self.head_dim
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scale = self.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.c_attn.num_heads, self.c_attn.num_kv_heads, self.head_dim, scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.q_size, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.act = get_act_fn(config.activation_function)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = on_first_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.wpe = on_first_stage(lambda: nn.Embedding(config.max_position_embeddings, config.hidden_size))
        self.start_layer, self.end_layer, self.h = make_layers(config.num_hidden_layers,
                                                               lambda i: GPT2Block(config, i))
        self.ln_f = on_last_stage(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))

    def forward(self, input_ids, positions, meta, inputs_embeds=None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
            x = x + self.wpe(positions)
        else:
            x = intermediate["hidden"]
        for block in self.h[self.start_layer:self.end_layer]:
            x = block(x, meta)
        if not get_pp_group().is_last:
            return {"hidden": x}
        return self.ln_f(x)


def _from_conv1d(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF GPT-2 names and layouts -> ours: add the `transformer.` prefix that old checkpoints lack, drop the
    causal-mask buffers, transpose Conv1D [in, out] weights to [out, in], and split fused c_attn into q/k/v."""
    for name, tensor in weights:
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name.endswith(".weight") and any(f".{conv}." in name for conv in ("c_attn", "c_proj", "c_fc")):
            tensor = tensor.t()
        if ".c_attn." in name:
            for shard, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                yield name.replace(".c_attn.", f".{shard}_proj."), part
        else:
            yield name, tensor


class GPT2LMHeadModel(nn.Module):
    # q/k/v pieces of the checkpoint's fused c_attn (see _from_conv1d) -> (our parameter, shard id)
    stacked_params = [("q_proj", "c_attn", "q"), ("k_proj", "c_attn", "k"), ("v_proj", "c_attn", "v")]
    intermediate_keys = ("hidden",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = on_last_stage(lambda: ParallelLMHead(config.vocab_size, config.hidden_size))
        tie_head(self.lm_head, self.transformer.wte, getattr(config, "tie_word_embeddings", True))

    def forward(self, input_ids, positions, meta, inputs_embeds=None, intermediate=None):
        return self.transformer(input_ids, positions, meta, inputs_embeds, intermediate)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights, skip = tied_head_weights(_from_conv1d(weights), getattr(self.config, "tie_word_embeddings", True),
                                          "transformer.wte.weight", "lm_head.weight")
        return load_params(self, weights, self.stacked_params, skip)
