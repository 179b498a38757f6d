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

from shardserve.distributed.parallel_state import get_pp_group
from shardserve.layers.activation import get_act_fn
from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from shardserve.models.loader import load_params
from shardserve.models.pipeline import (IntermediateTensors, make_layers, on_first_stage, on_last_stage, tie_head,
                                         tied_head_weights)


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
        self.embed_tokens = on_first_stage(lambda: VocabParallelEmbedding(config.vocab_size, word_dim))
        self.embed_positions = on_first_stage(
            lambda: OPTLearnedPositionalEmbedding(config.max_position_embeddings, hidden))
        projects = word_dim != hidden
        self.project_in = on_first_stage(lambda: ReplicatedLinear(word_dim, hidden)) if projects else None
        self.project_out = on_last_stage(lambda: ReplicatedLinear(hidden, word_dim)) if projects else None
        # `_remove_final_layer_norm` only exists for checkpoints fine-tuned before transformers 4.20.1.
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = on_last_stage(
                lambda: nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine))
        else:
            self.final_layer_norm = None
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda i: OPTDecoderLayer(config))

    def forward(self, input_ids, positions, meta, inputs_embeds=None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            if self.project_in is not None:
                x = self.project_in(x)
            x = x + self.embed_positions(positions)
        else:
            x = intermediate["hidden"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            x = layer(x, meta)
        if not get_pp_group().is_last:
            return {"hidden": x}
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids, positions, meta, inputs_embeds=None, intermediate=None):
        return self.decoder(input_ids, positions, meta, inputs_embeds, intermediate)


class OPTForCausalLM(nn.Module):
    # checkpoint name -> (our parameter, shard id) for weights we store merged
    stacked_params = [("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v")]
    intermediate_keys = ("hidden",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = on_last_stage(lambda: ParallelLMHead(config.vocab_size, config.word_embed_proj_dim))
        tie_head(self.lm_head, self.model.decoder.embed_tokens, getattr(config, "tie_word_embeddings", True))

    def forward(self, input_ids, positions, meta, inputs_embeds=None, intermediate=None):
        """Returns [num_tokens, word_embed_proj_dim] (= hidden_size except where OPT projects out), or on a
        stage before the last the hidden states for the next stage."""
        return self.model(input_ids, positions, meta, inputs_embeds, intermediate)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The original facebook/opt-* checkpoints name their tensors "decoder.…", without "model.".
        weights = ((f"model.{name}" if name.startswith("decoder.") else name, tensor) for name, tensor in weights)
        weights, skip = tied_head_weights(weights, getattr(self.config, "tie_word_embeddings", True),
                                          "model.decoder.embed_tokens.weight", "lm_head.weight")
        return load_params(self, weights, self.stacked_params, skip)
