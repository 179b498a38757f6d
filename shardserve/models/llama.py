"""Llama (and the families that are Llama with a twist: Mistral; Qwen2 adds QKV bias; Qwen3 adds QK-norm).
Layers whose config gives them a sliding window (Mistral 7B v0.1, Qwen2 with use_sliding_window) keep it.

Pre-norm decoder: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), rotary positions on q and k,
grouped-query attention. Tokens of the whole step arrive flattened: [num_tokens, hidden].
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_pp_group
from shardserve.layers.activation import SiluAndMul
from shardserve.layers.attention import Attention, AttentionMetadata, layer_sliding_window
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.layers.rotary import RotaryEmbedding, apply_qk_norm_rotary, apply_rotary
from shardserve.models.loader import load_params
from shardserve.models.pipeline import (IntermediateTensors, make_layers, on_first_stage, on_last_stage, tie_head,
                                         tied_head_weights)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_index: int, qkv_bias: bool, qk_norm: bool, norm: type[RMSNorm] = RMSNorm,
                 scale: float | None = None, softcap: float | None = None):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden,
                                        bias=getattr(config, "attention_bias", False) and not qk_norm)
        if qk_norm:
            self.q_norm = norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5 if scale is None else scale,
                              sliding_window=layer_sliding_window(config, layer_index), softcap=softcap)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], qkv: torch.Tensor, meta: AttentionMetadata):
        """The block after its QKV projection, which the decoder layer makes with the block's norm folded in
        (`qkv_proj.normed_forward`): rotary (and q/k norm), attention over the cache, the output projection."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        kv_store = self.attn.kv_store(v, meta)
        if self.qk_norm:
            q, k, kv_stored = apply_qk_norm_rotary(q, k, self.q_norm, self.k_norm, *rope, kv_store=kv_store)
        else:
            q, k, kv_stored = apply_rotary(q, k, *rope, kv_store=kv_store)
        return self.o_proj(self.attn(q, k, v, meta, kv_stored))


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate) * up), SwiGLU unless the family gives another gated activation."""

    def __init__(self, config, bias: bool = False, act: nn.Module | None = None, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        if act is None and getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Unsupported activation {config.hidden_act!r} for a Llama-style MLP (silu only).")
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))

    def normed_forward(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor):
        """The MLP of norm(x + residual), and the next residual (the norm and the gated activation within the
        first projection where they fold: layers/linear.py)."""
        h, residual = self.gate_up_proj.normed_forward(norm, x, residual, self.act)
        return self.down_proj(h), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, qkv_bias: bool, qk_norm: bool, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, qkv_bias, qk_norm)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, x, residual, meta):
        """`residual` is the stream before this layer (None at the first): each block's norm adds the previous
        block's output `x` to it first, inside the block's first projection where it folds (layers/gemv.py)."""
        qkv, residual = self.self_attn.qkv_proj.normed_forward(self.input_layernorm, x, residual)
        x = self.self_attn(rope, qkv, meta)
        if isinstance(self.mlp, LlamaMLP):
            return self.mlp.normed_forward(self.post_attention_layernorm, x, residual)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool = False, qk_norm: bool = False,
                 build_mlp: Callable[[int], nn.Module] | None = None):
        """`build_mlp(layer_index)`: the layer's MLP where it is not Llama's (None: Llama's)."""
        super().__init__()
        self.embed_tokens = on_first_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda i: LlamaDecoderLayer(config, i, qkv_bias, qk_norm, build_mlp(i) if build_mlp else None))
        self.norm = on_last_stage(lambda: RMSNorm(config.hidden_size, config.rms_norm_eps))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(config, head_dim, config.max_position_embeddings)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """What every layer's rotation reads this step, computed once."""
        return self.rotary_emb.cos_sin(positions, dtype)

    def forward(self, input_ids, positions, meta, inputs_embeds=None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            x, residual = intermediate["hidden"], intermediate["residual"]
        rope = self.rope(positions, x.dtype)
        for layer in self.layers[self.start_layer:self.end_layer]:
            x, residual = layer(rope, x, residual, meta)
        if not get_pp_group().is_last:
            return {"hidden": x, "residual": residual}
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # checkpoint name -> (our parameter, shard id) for weights we store merged
    stacked_params = [("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
                      ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1)]
    intermediate_keys = ("hidden", "residual")
    expert_projections: dict[str, tuple[str, str]] | None = None  # mixtures of experts (models/moe.py)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.lm_head = on_last_stage(lambda: ParallelLMHead(config.vocab_size, config.hidden_size))
        tie_head(self.lm_head, self.model.embed_tokens, getattr(config, "tie_word_embeddings", False))

    def build_model(self, config) -> nn.Module:
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        return LlamaModel(config, qkv_bias=qkv_bias, qk_norm=self.qk_norm,
                          build_mlp=lambda i: self.build_mlp(config, i))

    def build_mlp(self, config, layer_index: int) -> nn.Module | None:
        """The MLP of a layer where it is not Llama's (None): a mixture of experts, models/moe.py."""
        return None

    def forward(self, input_ids, positions, meta, inputs_embeds=None, intermediate=None):
        return self.model(input_ids, positions, meta, inputs_embeds, intermediate)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """As the model's first layer takes them (Gemma's scaled)."""
        return self.model.embed(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights, skip = tied_head_weights(weights, getattr(self.config, "tie_word_embeddings", False),
                                          "model.embed_tokens.weight", "lm_head.weight")
        return load_params(self, weights, self.stacked_params, skip + ("rotary_emb.inv_freq",),
                           self.expert_projections)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
