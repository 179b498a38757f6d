"""Gemma 3 (text): a Llama-style decoder with Gemma's twists.

- Embeddings are scaled by sqrt(hidden_size); the LM head is the unscaled embedding matrix.
- Every RMSNorm scales by (1 + weight) (layers/layernorm.py: GemmaRMSNorm), q and k are RMS-normed per head.
- Sandwich norms: each block's output is normed before it joins the residual stream, as well as its input:
  x += PostNorm(Attn(PreNorm(x))); x += PostNorm(GeGLU(PreNorm(x))).
- Local and global layers: `layer_types` makes most layers attend to a sliding window of the last
  `sliding_window` tokens, rotated with a local rope base, and every few a global layer with its own rope.
- Queries are scaled by query_pre_attn_scalar^-1/2, not head_dim^-1/2; logits may be soft-capped.
Tokens of the whole step arrive flattened: [num_tokens, hidden].
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_pp_group
from shardserve.layers.activation import GeluAndMul
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.layernorm import GemmaRMSNorm
from shardserve.layers.rotary import RotaryEmbedding
from shardserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from shardserve.models.loader import load_params
from shardserve.models.pipeline import (IntermediateTensors, make_layers, on_first_stage, on_last_stage, tie_head,
                                         tied_head_weights)

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _layer_type(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else "full_attention"


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.layer_type = _layer_type(config, layer_index)
        self.self_attn = LlamaAttention(config, layer_index, getattr(config, "attention_bias", False), qk_norm=True,
                                        norm=GemmaRMSNorm, scale=config.query_pre_attn_scalar ** -0.5)
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
        opens a block also adds the previous block's output to it."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(ropes[self.layer_type], x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = on_first_stage(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.embed_scale = config.hidden_size ** 0.5
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda i: Gemma3DecoderLayer(config, i))
        self.norm = on_last_stage(lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kinds = sorted({_layer_type(config, i) for i in range(config.num_hidden_layers)})
        self.rotary_embs = nn.ModuleDict({kind: RotaryEmbedding(config, head_dim, config.max_position_embeddings,
                                                                kind) for kind in kinds})

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the scale rounded to the model's dtype first, as transformers does
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def forward(self, input_ids, positions, meta, inputs_embeds=None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            x, residual = intermediate["hidden"], intermediate["residual"]
        ropes = {kind: rope.cos_sin(positions, x.dtype) for kind, rope in self.rotary_embs.items()}
        for layer in self.layers[self.start_layer:self.end_layer]:
            x, residual = layer(ropes, x, residual, meta)
        if not get_pp_group().is_last:
            return {"hidden": x, "residual": residual}
        x, _ = self.norm(x, residual)
        return x


class Gemma3ForCausalLM(nn.Module):
    stacked_params = LlamaForCausalLM.stacked_params
    intermediate_keys = ("hidden", "residual")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = on_last_stage(lambda: ParallelLMHead(config.vocab_size, config.hidden_size))
        tie_head(self.lm_head, self.model.embed_tokens, getattr(config, "tie_word_embeddings", True))
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids, positions, meta, inputs_embeds=None, intermediate=None):
        return self.model(input_ids, positions, meta, inputs_embeds, intermediate)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled, as the model's first layer takes them (and as transformers' embedding module gives them)."""
        return self.model.embed(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights, skip = tied_head_weights(weights, getattr(self.config, "tie_word_embeddings", True),
                                          "model.embed_tokens.weight", "lm_head.weight")
        return load_params(self, weights, self.stacked_params, skip + ("rotary_emb", "embed_scale"))
