"""Causal LMs as pooling models: the decoder's last hidden states, pooled, instead of next-token logits.

- embed: the last token's hidden state, normalised (e5-mistral, gte-Qwen2, Qwen3-Embedding), or as the
  model's Sentence Transformers files say (EmbeddingGemma: the mean, then Dense projections).
- classify: a linear `score` head on the last token (`*ForSequenceClassification`, e.g. Qwen3 rerankers
  and classifiers); the checkpoint holds the head.
- reward: every token's hidden state, as it is.

Attention stays causal (the model is the same decoder, only its output changes) unless the config makes it
bidirectional (`use_bidirectional_attention`: EmbeddingGemma). The LM head is dropped after construction.
Checkpoints of a bare decoder body (`LlamaModel`, `Qwen3Model`, `Gemma3TextModel`, ...) name their tensors
without the `model.` prefix, which is put back on loading.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from shardserve.layers.linear import ReplicatedLinear
from shardserve.layers.pooler import ClassificationPooler, EmbeddingPooler
from shardserve.models.gemma3 import Gemma3ForCausalLM
from shardserve.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from shardserve.models.sentence_transformers import dense_projector

_DEFAULT_POOLING = {"embed": "LAST", "classify": "LAST", "reward": "LAST"}


@functools.cache
def as_pooling_model(causal_lm: type[nn.Module], kind: str) -> type[nn.Module]:
    """`causal_lm` turned into a pooling model of this kind ("embed", "classify" or "reward")."""
    if kind not in _DEFAULT_POOLING:
        raise ValueError(f"Cannot convert a causal LM into {kind!r}; choose embed, classify or reward.")

    class PoolingModel(causal_lm):
        pooling_kind = kind
        default_pooling_type = _DEFAULT_POOLING[kind]
        is_causal = True

        def __init__(self, config, pooling):
            super().__init__(config)
            del self.lm_head  # never used: the hidden states are the output
            self.is_causal = not getattr(config, "use_bidirectional_attention", False)
            if kind == "classify":
                self.score = ReplicatedLinear(config.hidden_size, config.num_labels, bias=False)
                self.pooler = ClassificationPooler(config, pooling.sequence_pooling,
                                                   pooling.token_pooling, classifier=self.score)
            elif kind == "reward":
                self.pooler = ClassificationPooler(config, pooling.sequence_pooling,
                                                   pooling.token_pooling, classifier=None)
            else:
                self.pooler = EmbeddingPooler(pooling.sequence_pooling, pooling.token_pooling,
                                              dense_projector(pooling.sentence_transformers))

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            # The decoder body is the one child that is not a head ("model", or GPT-2's "transformer").
            body_name, body = next((n, m) for n, m in self.named_children() if n != "score")
            body_parts = {name.split(".", 1)[0] for name, _ in body.named_parameters()}

            def with_body_prefix():
                for name, tensor in weights:
                    if name.split(".", 1)[0] in body_parts:
                        name = f"{body_name}.{name}"
                    yield name, tensor
            return super().load_weights(with_body_prefix())

    PoolingModel.__name__ = PoolingModel.__qualname__ = f"{causal_lm.__name__.removesuffix('ForCausalLM')}" \
                                                        f"{_CLASS_SUFFIX[kind]}"
    return PoolingModel


_CLASS_SUFFIX = {"embed": "EmbeddingModel", "classify": "ForSequenceClassification", "reward": "RewardModel"}

LlamaEmbeddingModel = as_pooling_model(LlamaForCausalLM, "embed")
MistralEmbeddingModel = as_pooling_model(MistralForCausalLM, "embed")
Qwen2EmbeddingModel = as_pooling_model(Qwen2ForCausalLM, "embed")
Qwen3EmbeddingModel = as_pooling_model(Qwen3ForCausalLM, "embed")
LlamaForSequenceClassification = as_pooling_model(LlamaForCausalLM, "classify")
MistralForSequenceClassification = as_pooling_model(MistralForCausalLM, "classify")
Qwen2ForSequenceClassification = as_pooling_model(Qwen2ForCausalLM, "classify")
Qwen3ForSequenceClassification = as_pooling_model(Qwen3ForCausalLM, "classify")
Gemma3EmbeddingModel = as_pooling_model(Gemma3ForCausalLM, "embed")
Gemma3ForSequenceClassification = as_pooling_model(Gemma3ForCausalLM, "classify")
