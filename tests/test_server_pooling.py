"""The pooling routes of the online server (conftest's `server`): Cohere's /v2/embed through the official
`cohere` client, /v1/embeddings through `openai`, and /pooling, /classify, /score, /rerank over plain HTTP.
Every answer must equal the offline `LLM` on the same input."""
from __future__ import annotations

import base64

import cohere
import httpx
import numpy as np
import pytest
import torch
from conftest import API_KEY, assert_close_f32
from openai import OpenAI

from shardserve import LLM, PoolingParams
from shardserve.inputs import TokensPrompt
from shardserve.models.source import default_embedding_model

pytestmark = pytest.mark.timeout(300)

SENTENCES = ["A man is eating food.", "The new movie is awesome and everyone should see it at least twice.", "Hi"]
QUERY = "The capital of France is Paris"
DOCUMENTS = ["Paris is the capital of France.", "def add(a, b): return a + b", "The quick brown fox jumps.",
             "Rome is the capital of Italy."]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def minilm():
    return LLM(default_embedding_model())


@pytest.fixture(scope="module")
def minilm_st(minilm_st_dir):
    return LLM(minilm_st_dir)


@pytest.fixture(scope="module")
def cross(encoder_dirs):
    return LLM(encoder_dirs("bert", "classify", 1))


@pytest.fixture(scope="module")
def co(server):
    return cohere.ClientV2(api_key=API_KEY, base_url=server, timeout=60)


def post(server: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{route}", json=body, headers=HEADERS, timeout=60)


# Cohere /v2/embed ---------------------------------------------------------------------------------------

def test_cohere_embed_types_input_type_and_dimension(co, minilm_st):
    types = ["float", "binary", "ubinary", "int8", "uint8", "base64"]
    got = co.embed(model="minilm-st", texts=SENTENCES, input_type="search_query", embedding_types=types,
                   output_dimension=128)
    expected = minilm_st.embed(SENTENCES, PoolingParams(dimensions=128), prompt_name="search_query", use_tqdm=False)
    floats = np.array(got.embeddings.float_)
    assert floats.shape == (3, 128)
    for row, ref in zip(floats, expected):
        assert_close_f32(row, ref.outputs.embedding)
    assert got.texts == SENTENCES
    assert got.meta.billed_units.input_tokens == sum(len(o.prompt_token_ids) for o in expected)
    # binary: one bit per feature, 1 where it is >= 0, MSB first; as int8 (byte - 128) or as uint8 (ubinary)
    signs = floats >= 0
    assert np.array_equal(np.unpackbits((np.array(got.embeddings.binary) + 128).astype(np.uint8), axis=1), signs)
    assert np.array_equal(np.unpackbits(np.array(got.embeddings.ubinary, dtype=np.uint8), axis=1), signs)
    assert np.array(got.embeddings.binary).shape == (3, 16)
    int8, uint8 = np.array(got.embeddings.int8), np.array(got.embeddings.uint8)
    assert int8.min() >= -127 and int8.max() <= 127 and np.array_equal(uint8, int8 + 128)
    for q, f in zip(int8, floats):  # scaled and rounded: the same direction
        assert np.dot(q, f) / np.linalg.norm(q) / np.linalg.norm(f) > 0.999
    decoded = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in got.embeddings.base64]
    assert np.allclose(decoded, floats, atol=1e-6)
    # the prompt matters: a document embeds differently from a query
    document = co.embed(model="minilm-st", texts=SENTENCES[:1], input_type="search_document",
                        embedding_types=["float"])
    (ref,) = minilm_st.embed(SENTENCES[:1], prompt_name="search_document", use_tqdm=False)
    assert_close_f32(document.embeddings.float_[0], ref.outputs.embedding)
    assert not np.allclose(document.embeddings.float_[0][:128], floats[0], atol=1e-3)


def test_cohere_embed_inputs_and_truncation(server, minilm):
    text = " ".join(SENTENCES * 40)
    tokenizer = minilm.get_tokenizer()
    assert len(tokenizer(text)["input_ids"]) > 256
    r = post(server, "/v2/embed", {"model": "minilm", "inputs": [{"content": [{"type": "text", "text": text}]}]})
    (end,) = minilm.embed(text, truncate_prompt_tokens=-1, use_tqdm=False)   # END: keep the first tokens
    assert r.status_code == 200 and r.json()["meta"]["billed_units"]["input_tokens"] == 256
    assert_close_f32(r.json()["embeddings"]["float"][0], end.outputs.embedding)
    r = post(server, "/v2/embed", {"model": "minilm", "texts": [text], "truncate": "START"})
    (start,) = minilm.embed(text, PoolingParams(truncate_prompt_tokens=-1, truncation_side="left"), use_tqdm=False)
    assert start.prompt_token_ids[-2] == tokenizer(text)["input_ids"][-2]     # START: keep the last tokens
    assert_close_f32(r.json()["embeddings"]["float"][0], start.outputs.embedding)
    r = post(server, "/v2/embed", {"model": "minilm", "texts": [text], "truncate": "END", "max_tokens": 8})
    assert r.json()["meta"]["billed_units"]["input_tokens"] == 8
    r = post(server, "/v2/embed", {"model": "minilm", "texts": [text], "max_tokens": 10_000})
    assert r.json()["meta"]["billed_units"]["input_tokens"] == 256  # no more than the model takes
    r = post(server, "/v2/embed", {"model": "minilm", "texts": [text], "truncate": "NONE"})
    assert r.status_code == 400 and "maximum context length is 256 tokens" in r.json()["error"]["message"]
    r = post(server, "/v2/embed", {"model": "minilm", "texts": SENTENCES, "truncate": "NONE", "max_tokens": 5})
    assert r.status_code == 400 and "max_tokens=5" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,message", [
    ({"model": "minilm", "texts": ["x"], "input_type": "search_query"}, "defines no prompts"),
    ({"model": "minilm-st", "texts": ["x"], "input_type": "clustering"}, "'search_query', 'search_document'"),
    ({"model": "minilm", "texts": ["x"], "embedding_types": ["float", "int4"]}, "embedding_types"),
    ({"model": "minilm", "texts": ["x"], "output_dimension": 64}, "does not support matryoshka"),
    ({"model": "minilm", "texts": []}, "exactly one of texts, images or inputs"),
    ({"model": "minilm", "images": ["data:image/png;base64,AAAA"]}, "text only"),
    ({"model": "minilm", "texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
    ({"model": "tiny", "texts": ["x"]}, "'generate' runner"),
])
def test_cohere_embed_errors(server, body, message):
    r = post(server, "/v2/embed", body)
    assert r.status_code == 400, r.text
    assert "error" in r.json() and message in r.json()["error"]["message"]


def test_v2_routes_need_the_api_key(server):
    assert httpx.post(f"{server}/v2/embed", json={"model": "minilm", "texts": ["x"]}).status_code == 401
    assert httpx.post(f"{server}/v2/rerank", json={"model": "cross", "query": "a", "documents": ["b"]}
                      ).status_code == 401


# OpenAI embeddings: dimensions and the chat form --------------------------------------------------------

def test_embeddings_dimensions_and_messages(server, minilm_st):
    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    got = client.embeddings.create(model="minilm-st", input=SENTENCES, dimensions=256)
    for d, ref in zip(got.data, minilm_st.embed(SENTENCES, PoolingParams(dimensions=256), use_tqdm=False)):
        assert len(d.embedding) == 256
        assert_close_f32(d.embedding, ref.outputs.embedding)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = post(server, "/v1/embeddings", {"model": "minilm-st", "messages": messages, "chat_template": template})
    rendered = "user: What is the capital of France?\n"
    ids = minilm_st.get_tokenizer().encode(rendered, add_special_tokens=False)  # the template writes specials
    (ref,) = minilm_st.embed(TokensPrompt(prompt_token_ids=ids), use_tqdm=False)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
    assert_close_f32(r.json()["data"][0]["embedding"], ref.outputs.embedding)


# /pooling, /classify ------------------------------------------------------------------------------------

def test_pooling_token_embeddings_and_base64(server, minilm):
    r = post(server, "/pooling", {"model": "minilm", "input": SENTENCES[:2], "task": "token_embed"})
    expected = minilm.encode(SENTENCES[:2], pooling_task="token_embed", use_tqdm=False)
    assert r.status_code == 200 and r.json()["object"] == "list"
    for item, ref in zip(r.json()["data"], expected):
        assert item["object"] == "pooling" and len(item["data"]) == len(ref.prompt_token_ids)
        assert_close_f32(item["data"], ref.outputs.data)
    r = post(server, "/pooling", {"model": "minilm", "input": SENTENCES[0], "encoding_format": "base64"})
    (ref,) = minilm.embed(SENTENCES[0], use_tqdm=False)  # no task: the model's own (embed)
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["data"]), dtype="<f4").copy()
    assert_close_f32(decoded, ref.outputs.embedding)


def test_classify_equals_offline(server, encoder_dirs):
    model_dir = encoder_dirs("bert", "classify", 3)
    offline = LLM(model_dir)
    labels = offline.llm_engine.processor.hf_config.id2label
    r = post(server, "/classify", {"model": "classifier", "input": SENTENCES})
    assert r.status_code == 200
    body = r.json()
    for item, ref in zip(body["data"], offline.classify(SENTENCES, use_tqdm=False)):
        assert item["num_classes"] == 3
        assert_close_f32(item["probs"], ref.outputs.probs)
        assert item["label"] == labels[int(np.argmax(ref.outputs.probs))]
    assert body["usage"]["prompt_tokens"] > len(SENTENCES)
    raw = post(server, "/classify", {"model": "classifier", "input": SENTENCES[0], "use_activation": False}).json()
    (ref,) = offline.classify(SENTENCES[0], PoolingParams(use_activation=False), use_tqdm=False)
    assert_close_f32(raw["data"][0]["probs"], ref.outputs.probs)


# /score, /rerank ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/score", "/v1/score"])
def test_cross_encoder_scores_equal_offline(server, cross, route):
    expected = [o.outputs.score for o in cross.score(QUERY, DOCUMENTS, use_tqdm=False)]
    r = post(server, route, {"model": "cross", "text_1": QUERY, "text_2": DOCUMENTS})
    assert r.status_code == 200
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2, 3]
    assert_close_f32([d["score"] for d in r.json()["data"]], expected)
    pairwise = [o.outputs.score for o in cross.score(SENTENCES, DOCUMENTS[:3], use_tqdm=False)]
    r = post(server, route, {"model": "cross", "queries": SENTENCES, "documents": DOCUMENTS[:3]})
    assert_close_f32([d["score"] for d in r.json()["data"]], pairwise)


def test_embedding_model_scores_by_cosine(server, minilm):
    expected = [o.outputs.score for o in minilm.score(QUERY, DOCUMENTS, use_tqdm=False)]
    r = post(server, "/score", {"model": "minilm", "text_1": QUERY, "text_2": DOCUMENTS})
    assert_close_f32([d["score"] for d in r.json()["data"]], expected)
    assert int(np.argmax(expected)) == 0  # a real embedding model: Paris matches Paris


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_documents(server, cross, route):
    scores = [o.outputs.score for o in cross.score(QUERY, DOCUMENTS, use_tqdm=False)]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    r = post(server, route, {"model": "cross", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == order[:2]
    assert_close_f32([x["relevance_score"] for x in results], [scores[i] for i in order[:2]])
    assert [x["document"]["text"] for x in results] == [DOCUMENTS[i] for i in order[:2]]
    r = post(server, route, {"model": "cross", "query": QUERY, "documents": DOCUMENTS, "return_documents": False})
    assert [x["index"] for x in r.json()["results"]] == order and "document" not in r.json()["results"][0]
    assert r.json()["usage"]["total_tokens"] > len(DOCUMENTS)


def test_cohere_client_reranks(co, minilm):
    scores = [o.outputs.score for o in minilm.score(QUERY, DOCUMENTS, use_tqdm=False)]
    got = co.rerank(model="minilm", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [x.index for x in got.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])[:3]
    assert got.results[0].relevance_score == pytest.approx(max(scores), abs=1e-5)


@pytest.mark.parametrize("route,body,message", [
    ("/classify", {"model": "minilm", "input": "x"}, "does not serve the 'classify' pooling task"),
    ("/score", {"model": "cross", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "Got 2 texts to score against 3"),
    ("/score", {"model": "cross", "text_1": "a"}, "text_1 and text_2"),
    ("/score", {"model": "classifier", "text_1": "a", "text_2": "b"}, "does not serve the 'score' pooling task"),
    ("/rerank", {"model": "cross", "query": "a", "documents": []}, "at least one document"),
    ("/rerank", {"model": "cross", "query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
    ("/rerank", {"model": "tiny", "query": "a", "documents": ["b"]}, "'generate' runner"),
    ("/pooling", {"model": "minilm", "input": "x", "task": "classify"}, "does not serve the 'classify'"),
    ("/pooling", {"model": "minilm", "input": "x", "truncation_side": "middle"}, "truncation_side"),
    ("/v1/embeddings", {"model": "minilm", "input": ["x", "y"], "priority": 1}, "priority scheduling is not enabled"),
    ("/rerank", {"model": "cross", "query": "a", "documents": ["b"], "priority": -1}, "--scheduling-policy priority"),
])
def test_pooling_route_errors(server, route, body, message):
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    assert "error" in r.json() and message in r.json()["error"]["message"]
    # the model keeps serving
    assert post(server, "/v1/embeddings", {"model": "minilm", "input": "still here"}).status_code == 200


def test_token_id_input_equals_text(server, minilm):
    """Token-id input to /pooling gives what the text gives."""
    ids = minilm.get_tokenizer().encode(SENTENCES[1])
    by_ids = post(server, "/pooling", {"model": "minilm", "input": ids}).json()["data"][0]["data"]
    by_text = post(server, "/pooling", {"model": "minilm", "input": SENTENCES[1]}).json()["data"][0]["data"]
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6)
