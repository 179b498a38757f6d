"""BERT (Devlin et al., 2019): a bidirectional encoder with learned absolute positions and token types.

x = LN(word + position + token_type); per layer, post-norm: x = LN(x + Attn(x)); x = LN(x + FFN(x)),
attention over the whole prompt in both directions. Tokens of the whole step arrive flattened:
[num_tokens, hidden], each prompt whole (encoder attention cannot be chunked).

`BertEmbeddingModel` (checkpoints of `BertModel`: all-MiniLM, bge, e5, ...) pools the last hidden states
(CLS unless Sentence Transformers or the user say otherwise); `BertForSequenceClassification`
(cross-encoders such as the ms-marco rerankers) runs BERT's pooler (dense + tanh on [CLS]) and a linear
classifier. Parameter names follow Hugging Face's, so checkpoints load as they are.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_pp_group
from shardserve.layers.activation import get_act_fn
from shardserve.layers.attention import Attention, AttentionMetadata
from shardserve.layers.embedding import VocabParallelEmbedding
from shardserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from shardserve.layers.pooler import ClassificationPooler, EmbeddingPooler
from shardserve.models.loader import load_params
from shardserve.models.pipeline import IntermediateTensors, make_layers, on_first_stage
from shardserve.models.sentence_transformers import dense_projector


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.position_embeddings(positions)
        # Without token types every token is type 0: add that row rather than look it up per token.
        x = x + (self.token_type_embeddings.weight[0] if token_type_ids is None
                 else self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads = config.num_attention_heads
        self.head_dim = config.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, heads, bias=True)
        self.q_size = self.qkv_proj.num_heads * self.head_dim
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.q_size, dim=-1)
        return self.attn(q, k, v, meta)


class BertSelfOutput(nn.Module):
    """The projection after a sublayer, then the post-norm residual: LN(x + dense(h))."""

    def __init__(self, input_size: int, config):
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(x, meta), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        # this pipeline stage's layers; parameter names keep their global index
        self.start_layer, self.end_layer, self.layer = make_layers(config.num_hidden_layers,
                                                                   lambda i: BertLayer(config))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        for layer in self.layer[self.start_layer:self.end_layer]:
            x = layer(x, meta)
        return x


class BertPooler(nn.Module):
    """BERT's own pooler, trained with the next-sentence objective: tanh(dense(hidden of [CLS]))."""

    def __init__(self, config):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class BertModel(nn.Module):
    embeddings_cls = BertEmbeddings
    intermediate_keys = ("hidden",)  # what a pipeline stage hands to the next

    def __init__(self, config, add_pooler: bool = False):
        super().__init__()
        self.embeddings = on_first_stage(lambda: self.embeddings_cls(config))
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooler else None

    def forward(self, input_ids, positions, meta, inputs_embeds=None, token_type_ids=None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        x = self.embeddings(input_ids, positions, token_type_ids, inputs_embeds) if intermediate is None \
            else intermediate["hidden"]
        x = self.encoder(x, meta)
        return x if get_pp_group().is_last else {"hidden": x}


# checkpoint name part -> (our merged parameter, shard id)
STACKED_PARAMS = [("query", "qkv_proj", "q"), ("key", "qkv_proj", "k"), ("value", "qkv_proj", "v")]


def hf_names(weights: Iterable[tuple[str, torch.Tensor]], strip_prefix: str | None = None
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names as our modules spell them: old checkpoints' LayerNorm gamma/beta become
    weight/bias, and a body saved inside a task model (`bert.` / `roberta.`) is unwrapped when asked."""
    for name, tensor in weights:
        if strip_prefix is not None:
            name = name.removeprefix(strip_prefix)
        if name.endswith("LayerNorm.gamma"):
            name = name[:-len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[:-len("beta")] + "bias"
        yield name, tensor


class BertEmbeddingModel(BertModel):
    """A BertModel checkpoint as an embedding model: encoder + pooler (+ Sentence Transformers Dense)."""
    pooling_kind = "embed"
    default_pooling_type = "CLS"
    is_causal = False
    base_model_prefix = "bert."

    def __init__(self, config, pooling):
        super().__init__(config)
        self.config = config
        self.pooler = EmbeddingPooler(pooling.sequence_pooling, pooling.token_pooling,
                                      dense_projector(pooling.sentence_transformers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_params(self, hf_names(weights, strip_prefix=self.base_model_prefix), STACKED_PARAMS)


class BertForSequenceClassification(nn.Module):
    pooling_kind = "classify"
    default_pooling_type = "CLS"
    is_causal = False
    intermediate_keys = BertModel.intermediate_keys

    def __init__(self, config, pooling):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooler=True)
        self.classifier = ReplicatedLinear(config.hidden_size, config.num_labels, bias=True)
        self.pooler = ClassificationPooler(config, pooling.sequence_pooling, pooling.token_pooling,
                                           classifier=self._classify, token_classifier=self.classifier)

    def _classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler (dense + tanh on the [CLS] row), then the classifier."""
        return self.classifier(self.bert.pooler(cls_hidden))

    def forward(self, input_ids, positions, meta, inputs_embeds=None, token_type_ids=None, intermediate=None):
        return self.bert(input_ids, positions, meta, inputs_embeds, token_type_ids, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_params(self, hf_names(weights), STACKED_PARAMS)
