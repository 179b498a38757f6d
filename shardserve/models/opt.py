"""OPT (Zhang et al., 2022): a GPT-style decoder with learned absolute positions and biases everywhere.

x += Attn(LN(x)); x += FC2(act(FC1(LN(x)))) with LayerNorm before each block (125m, 1.3b, ...) or
after each residual add (350m, `do_layer_norm_before=False`). Positions are learned and offset by 2;
some sizes embed words in a smaller space (`word_embed_proj_dim`) and project in and out of the
decoder. The LM head is tied to the word embedding. Tokens arrive flattened: [num_tokens, hidden].
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shardserve.layers.activation import get_act_fn
from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from shardserve.models.loader import load_params


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """OPT's positions start at row 2 of the table (rows 0 and 1 are a leftover of fairseq's padding)."""
    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int):
        super().__init__(num_positions + self.offset, embedding_dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.offset)


class OPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        self.head_dim = hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads, bias=config.enable_bias)
        self.q_size = self.qkv_proj.num_heads * self.head_dim
        self.out_proj = RowParallelLinear(hidden, hidden, bias=config.enable_bias)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.q_size, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=config.enable_bias)
        self.act = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        pre_norm = self.do_layer_norm_before  # False only for opt-350m: LayerNorm after the residual add
        residual = x
        if pre_norm:
            x = self.self_attn_layer_norm(x)
        x = residual + self.self_attn(x, meta)
        if not pre_norm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if pre_norm:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(self.act(self.fc1(x)))
        if not pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, word_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, hidden)
        self.project_in = ReplicatedLinear(word_dim, hidden) if word_dim != hidden else None
        self.project_out = ReplicatedLinear(hidden, word_dim) if word_dim != hidden else None
        # `_remove_final_layer_norm` only exists for checkpoints fine-tuned before transformers 4.20.1.
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        return self.decoder(input_ids, positions, meta, inputs_embeds)


class OPTForCausalLM(nn.Module):
    # checkpoint name -> (our parameter, shard id) for weights we store merged
    stacked_params = [("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v")]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_to(self.model.decoder.embed_tokens)

    def forward(self, input_ids, positions, meta, inputs_embeds=None) -> torch.Tensor:
        """Returns [num_tokens, word_embed_proj_dim] (= hidden_size except where OPT projects out)."""
        return self.model(input_ids, positions, meta, inputs_embeds)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.weight",) if getattr(self.config, "tie_word_embeddings", True) else ()
        # The original facebook/opt-* checkpoints name their tensors "decoder.…", without "model.".
        weights = ((f"model.{name}" if name.startswith("decoder.") else name, tensor) for name, tensor in weights)
        return load_params(self, weights, self.stacked_params, skip)
