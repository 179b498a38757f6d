"""Gemma 3 (text) and Gemma 2: a Llama-style decoder with Gemma's twists.

- Embeddings are scaled by sqrt(hidden_size); the LM head is the unscaled embedding matrix.
- Every RMSNorm scales by (1 + weight) (layers/layernorm.py: GemmaRMSNorm), q and k are RMS-normed per head.
- Sandwich norms: each block's output is normed before it joins the residual stream, as well as its input:
  x += PostNorm(Attn(PreNorm(x))); x += PostNorm(GeGLU(PreNorm(x))).
- Local and global layers: `layer_types` makes most layers attend to a sliding window of the last
  `sliding_window` tokens, rotated with a local rope base, and every few a global layer with its own rope.
- Queries are scaled by query_pre_attn_scalar^-1/2, not head_dim^-1/2; logits may be soft-capped.
- Gemma 2 is the same decoder without the per-head q/k norms, one rope for both kinds of layer, and its
  attention logits soft-capped too (attn_logit_softcapping: softcap * tanh(logits / softcap)).
Tokens of the whole step arrive flattened: [num_tokens, hidden].
"""
from __future__ import annotations

import torch
from torch import nn

from shardserve.layers.activation import GeluAndMul
from shardserve.layers.embedding import VocabParallelEmbedding
from shardserve.layers.layernorm import GemmaRMSNorm
from shardserve.layers.rotary import RotaryEmbedding
from shardserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from shardserve.models.pipeline import make_layers, on_first_stage, on_last_stage

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _layer_type(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else "full_attention"


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int, qk_norm: bool = True):
        super().__init__()
        self.layer_type = _layer_type(config, layer_index)
        self.self_attn = LlamaAttention(config, layer_index, getattr(config, "attention_bias", False), qk_norm,
                                        norm=GemmaRMSNorm, scale=config.query_pre_attn_scalar ** -0.5,
                                        softcap=getattr(config, "attn_logit_softcapping", None))
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported activation {act!r} for Gemma 3 (gelu_pytorch_tanh or gelu).")
        self.mlp = LlamaMLP(config, act=GeluAndMul(_ACTIVATIONS[act]))
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, ropes, x, residual, meta):
        """`residual` is the stream before this layer's input norm (None at the first layer): each norm that
        opens a block also adds the previous block's output to it, inside the block's first projection where it
        folds (layers/gemv.py)."""
        qkv, residual = self.self_attn.qkv_proj.normed_forward(self.input_layernorm, x, residual)
        x = self.post_attention_layernorm(self.self_attn(ropes[self.layer_type], qkv, meta))
        x, residual = self.mlp.normed_forward(self.pre_feedforward_layernorm, x, residual)
        return self.post_feedforward_layernorm(x), residual


class Gemma3Model(LlamaModel):
    """Llama's forward (models/llama.py) over Gemma's layers, with its embedding scale and a rope per kind of
    layer."""

    def __init__(self, config, qk_norm: bool = True):
        nn.Module.__init__(self)
        self.embed_tokens = on_first_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.embed_scale = config.hidden_size ** 0.5
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda i: Gemma3DecoderLayer(config, i, qk_norm))
        self.norm = on_last_stage(lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kinds = sorted({_layer_type(config, i) for i in range(config.num_hidden_layers)})
        self.rotary_embs = nn.ModuleDict({kind: RotaryEmbedding(config, head_dim, config.max_position_embeddings,
                                                                kind) for kind in kinds})

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the scale rounded to the model's dtype first, as transformers does
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        return {kind: rope.cos_sin(positions, dtype) for kind, rope in self.rotary_embs.items()}


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Llama's causal LM around Gemma's model; the tied head reads the unscaled embedding matrix."""
    qk_norm = True

    def __init__(self, config):
        super().__init__(config)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def build_model(self, config) -> nn.Module:
        return Gemma3Model(config, self.qk_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    qk_norm = False
