"""Encoders against transformers on the same random weights: BERT, RoBERTa and XLM-R bodies (pooled
hidden states) and their sequence-classification heads (class probabilities, cross-encoder pair scores).

Every call sends prompts of different lengths together, so they share one packed forward: an output equal
to transformers' run of that prompt alone also shows that packed prompts do not see each other.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from conftest import assert_close_f32, hf_last_hidden
from shardserve import LLM, PoolingParams

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
         "The capital of France is Paris, and the capital of Italy is Rome.", "def add(a, b): return a + b",
         "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000"]
PAIRS = [("What is the capital of France?", "The capital of France is Paris."),
         ("Hello, world!", "The quick brown fox jumps over the lazy dog."),
         ("def add(a, b):", "return a + b")]
ARCHS = ["bert", "roberta", "xlmr"]


@torch.no_grad()
def _hf_logits(model_dir: str, texts: list) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return [model(**tokenizer(*(t if isinstance(t, tuple) else (t,)), return_tensors="pt")).logits[0]
            for t in texts]


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_embeddings_equal_transformers(arch, encoder_dirs):
    model_dir = encoder_dirs(arch)
    llm = LLM(model_dir)
    assert llm.llm_engine.runner == "pooling"
    expected = hf_last_hidden(model_dir, TEXTS)
    # The architecture's default: the [CLS] / <s> row, L2-normalised.
    for out, hidden in zip(llm.embed(TEXTS, use_tqdm=False), expected):
        assert_close_f32(out.outputs.embedding, torch.nn.functional.normalize(hidden[0], dim=0))
    # use_activation=False: the raw pooled vector.
    for out, hidden in zip(llm.embed(TEXTS, PoolingParams(use_activation=False), use_tqdm=False), expected):
        assert_close_f32(out.outputs.embedding, hidden[0])
    # Every token's hidden state (ALL pooling), raw.
    outs = llm.encode(TEXTS, PoolingParams(use_activation=False), pooling_task="token_embed", use_tqdm=False)
    for out, hidden in zip(outs, expected):
        assert_close_f32(out.outputs.data, hidden)
        assert len(out.prompt_token_ids) == hidden.shape[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_probabilities_equal_transformers(arch, encoder_dirs):
    model_dir = encoder_dirs(arch, "classify", num_labels=3)
    llm = LLM(model_dir)
    assert llm.llm_engine.processor.pooling.tasks == ("classify", "token_classify")  # 3 labels: no pair score
    outs = llm.classify(TEXTS, use_tqdm=False)
    for out, logits in zip(outs, _hf_logits(model_dir, TEXTS)):
        assert_close_f32(out.outputs.probs, logits.softmax(-1))
        assert out.outputs.num_classes == 3
    raw = llm.classify(TEXTS[:2], PoolingParams(use_activation=False), use_tqdm=False)
    for out, logits in zip(raw, _hf_logits(model_dir, TEXTS[:2])):
        assert_close_f32(out.outputs.probs, logits)
    with pytest.raises(ValueError, match="does not serve the 'score' pooling task"):
        llm.score("a", "b")


@pytest.mark.parametrize("arch", ARCHS)
def test_cross_encoder_pair_scores_equal_transformers(arch, encoder_dirs):
    model_dir = encoder_dirs(arch, "classify", num_labels=1)
    llm = LLM(model_dir)
    expected = [torch.sigmoid(logits)[0] for logits in _hf_logits(model_dir, PAIRS)]
    # N-to-N: data_1[i] against data_2[i], each pair read jointly (BERT with token types 0 / 1).
    outs = llm.score([q for q, _ in PAIRS], [d for _, d in PAIRS], use_tqdm=False)
    assert [o.request_id for o in outs] == sorted({o.request_id for o in outs}, key=int)
    for out, score in zip(outs, expected):
        assert_close_f32(out.outputs.score, score)
    # 1-to-N: one query against every document.
    query, docs = PAIRS[0][0], [d for _, d in PAIRS]
    expected_1n = [torch.sigmoid(logits)[0] for logits in _hf_logits(model_dir, [(query, d) for d in docs])]
    for out, score in zip(llm.score(query, docs, use_tqdm=False), expected_1n):
        assert_close_f32(out.outputs.score, score)
    # A one-label classifier also classifies single texts (sigmoid of its logit).
    for out, logits in zip(llm.classify(TEXTS[:2], use_tqdm=False), _hf_logits(model_dir, TEXTS[:2])):
        assert_close_f32(out.outputs.probs, torch.sigmoid(logits))
    with pytest.raises(ValueError, match="Got 3 texts to score against 2"):
        llm.score(["a", "b", "c"], ["x", "y"])


def test_bert_token_types_matter(encoder_dirs):
    """The pair's second segment is embedded as type 1: scoring the same tokens as one segment differs."""
    llm = LLM(encoder_dirs("bert", "classify", num_labels=1))
    (pair,) = llm.score("hello world", "the quick fox", use_tqdm=False)
    (flat,) = llm.encode({"prompt_token_ids": pair.prompt_token_ids}, pooling_task="score", use_tqdm=False)
    # How far the types move a random model's score varies with the session's tokenizer and weights: 0.02 in one
    # run, 1.4e-5 in another (the widened weights can saturate the pooler's tanh). The same tokens scored in
    # another batch differ by 0.0, so anything clearly above rounding shows the types are used.
    assert abs(pair.outputs.score - flat.outputs.data.item()) > 2e-6


def test_roberta_positions_fill_the_table(encoder_dirs):
    """RoBERTa's positions start at padding_idx + 1: 66 rows hold exactly 64 tokens."""
    model_dir = encoder_dirs("roberta")
    llm = LLM(model_dir)
    assert llm.llm_engine.max_model_len == 64
    ids = AutoTokenizer.from_pretrained(model_dir)(" ".join(["fox"] * 80), truncation=True, max_length=64)["input_ids"]
    assert len(ids) == 64
    (out,) = llm.encode({"prompt_token_ids": ids}, PoolingParams(use_activation=False), pooling_task="token_embed",
                        use_tqdm=False)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(model_dir)(torch.tensor([ids])).last_hidden_state[0]
    assert_close_f32(out.outputs.data, expected)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        llm.embed({"prompt_token_ids": ids + [5]}, use_tqdm=False)
