"""RoBERTa (Liu et al., 2019) and XLM-RoBERTa (Conneau et al., 2020): BERT's encoder, another embedding.

Positions start after the padding index (fairseq's convention): token i of a prompt has position
padding_idx + 1 + i, so the table's first padding_idx + 1 rows are never used and the longest prompt is
max_position_embeddings - padding_idx - 1 tokens. Token types are all 0 (type_vocab_size = 1). The
sequence-classification head is dense + tanh + projection on <s>, without BERT's pooler.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shardserve.layers.linear import ReplicatedLinear
from shardserve.layers.pooler import ClassificationPooler
from shardserve.models.bert import STACKED_PARAMS, BertEmbeddingModel, BertEmbeddings, BertModel, hf_names
from shardserve.models.loader import load_params


def position_offset(config) -> int:
    return config.pad_token_id + 1


def max_model_len(config) -> int:
    return config.max_position_embeddings - position_offset(config)


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config):
        super().__init__(config)
        self.offset = position_offset(config)

    def forward(self, input_ids, positions, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        return super().forward(input_ids, positions + self.offset, token_type_ids, inputs_embeds)


class RobertaModel(BertModel):
    embeddings_cls = RobertaEmbeddings


class RobertaEmbeddingModel(RobertaModel, BertEmbeddingModel):
    base_model_prefix = "roberta."
    max_model_len = staticmethod(max_model_len)


class RobertaClassificationHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)
        self.out_proj = ReplicatedLinear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_hidden)))


class RobertaForSequenceClassification(nn.Module):
    pooling_kind = "classify"
    default_pooling_type = "CLS"
    is_causal = False
    intermediate_keys = RobertaModel.intermediate_keys
    max_model_len = staticmethod(max_model_len)

    def __init__(self, config, pooling):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config)
        self.classifier = RobertaClassificationHead(config)
        self.pooler = ClassificationPooler(config, pooling.sequence_pooling, pooling.token_pooling,
                                           classifier=self.classifier)

    def forward(self, input_ids, positions, meta, inputs_embeds=None, token_type_ids=None, intermediate=None):
        return self.roberta(input_ids, positions, meta, inputs_embeds, token_type_ids, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_params(self, hf_names(weights), STACKED_PARAMS)
