"""Decoders as pooling models against transformers on the same random weights: Llama / Qwen3 embeddings
(last token, normalised), Qwen3 / Llama sequence classifiers (`*ForSequenceClassification`), a reward
model's per-token hidden states; and which runner a model gets.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from conftest import _config, assert_close_f32, build_tokenizer, hf_last_hidden
from shardserve import LLM, PoolingParams, SamplingParams

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
         "The capital of France is Paris, and the capital of Italy is Rome."]


def _save(model, path) -> str:
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory):
    """arch -> a random `*ForSequenceClassification` decoder with 3 labels."""
    cache = {}

    def get(arch: str, num_labels: int = 3) -> str:
        if (arch, num_labels) not in cache:
            config = _config(arch, len(build_tokenizer()))
            config.num_labels = num_labels
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                model.score.weight.mul_(20.0)  # spread the logits so probabilities differ
            cache[arch, num_labels] = _save(model, tmp_path_factory.mktemp(f"{arch}-cls-{num_labels}"))
        return cache[arch, num_labels]
    return get


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_causal_lm_converted_to_embeddings(arch, model_dirs):
    model_dir = model_dirs(arch)
    llm = LLM(model_dir, runner="pooling")  # convert="auto" makes a causal LM an embedding model
    pooling = llm.llm_engine.processor.pooling
    assert (pooling.kind, pooling.sequence_pooling) == ("embed", "LAST")
    for out, hidden in zip(llm.embed(TEXTS, use_tqdm=False), hf_last_hidden(model_dir, TEXTS)):
        assert_close_f32(out.outputs.embedding, torch.nn.functional.normalize(hidden[-1], dim=0))
    assert not hasattr(llm.llm_engine.executor.worker.model, "lm_head")


def test_bare_decoder_checkpoint_is_an_embedding_model(tmp_path):
    """A `Qwen3Model` checkpoint (no LM head, tensor names without "model.") runs as pooling by default."""
    config = _config("qwen3", len(build_tokenizer()))
    torch.manual_seed(1)
    model_dir = _save(AutoModel.from_config(config, dtype=torch.float32), tmp_path)
    llm = LLM(model_dir)
    assert llm.llm_engine.runner == "pooling"
    outs = llm.embed(TEXTS, PoolingParams(use_activation=False), use_tqdm=False)
    for out, hidden in zip(outs, hf_last_hidden(model_dir, TEXTS)):
        assert_close_f32(out.outputs.embedding, hidden[-1])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sequence_classifier_equals_transformers(arch, classifier_dirs):
    model_dir = classifier_dirs(arch)
    llm = LLM(model_dir)
    assert llm.llm_engine.runner == "pooling"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = [hf(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS]
    for out, expected in zip(llm.classify(TEXTS, use_tqdm=False), logits):
        assert_close_f32(out.outputs.probs, expected.softmax(-1))
    # per token: the score head at every position (the last one is the sequence's logits)
    (tokens,) = llm.encode(TEXTS[0], PoolingParams(use_activation=False), pooling_task="token_classify",
                           use_tqdm=False)
    assert_close_f32(tokens.outputs.data[-1], logits[0])


def test_decoder_cross_encoder_scores_pairs(classifier_dirs):
    model_dir = classifier_dirs("qwen3", num_labels=1)
    llm = LLM(model_dir, task="score")  # vLLM's older spelling of runner="pooling", convert="classify"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pairs = [("What is the capital of France?", "Paris."), ("Hello", "world")]
    with torch.no_grad():
        expected = [torch.sigmoid(hf(**tokenizer(q, d, return_tensors="pt")).logits[0, 0]) for q, d in pairs]
    outs = llm.score([q for q, _ in pairs], [d for _, d in pairs], use_tqdm=False)
    for out, score in zip(outs, expected):
        assert_close_f32(out.outputs.score, score)


def test_reward_model_returns_every_tokens_hidden_state(model_dirs):
    model_dir = model_dirs("llama")
    llm = LLM(model_dir, convert="reward")
    (out,) = llm.reward(TEXTS[0], use_tqdm=False)
    (expected,) = hf_last_hidden(model_dir, TEXTS[:1])
    assert_close_f32(out.outputs.data, expected)
    (default,) = llm.encode(TEXTS[0], use_tqdm=False)  # encode's default task for a reward model
    assert_close_f32(default.outputs.data, expected)


def test_runner_selection_and_wrong_api(model_dirs, encoder_dirs):
    generator = LLM(model_dirs("llama"))
    assert generator.llm_engine.runner == "generate"
    with pytest.raises(ValueError, match="runner='generate'.*runner='pooling'"):
        generator.embed("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="runner='generate'"):
        generator.score("a", "b", use_tqdm=False)
    embedder = LLM(encoder_dirs("bert"))
    with pytest.raises(ValueError, match="runner='pooling'.*runner='generate'"):
        embedder.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="runner='pooling'.*runner='generate'"):
        embedder.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    with pytest.raises(ValueError, match="does not serve the 'classify' pooling task; it serves embed, token_embed"):
        embedder.classify("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="BertModel is a pooling model; create the LLM with runner='pooling'"):
        LLM(encoder_dirs("bert"), runner="generate")
    with pytest.raises(ValueError, match="cannot change that"):
        LLM(encoder_dirs("bert"), convert="classify")
    with pytest.raises(ValueError, match="conflicts with runner='generate'"):
        LLM(encoder_dirs("bert"), task="embed", runner="generate")
    with pytest.raises(ValueError, match="Unknown runner"):
        LLM(encoder_dirs("bert"), runner="embedding")


def test_step_pooling_keeps_the_step_tag_rows(model_dirs):
    """STEP pooling (process reward models): only the rows at the step-tag token, optionally only some of
    their columns."""
    model_dir = model_dirs("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("one. two. three.")["input_ids"]
    tag = tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    assert ids.count(tag) >= 2
    llm = LLM(model_dir, convert="reward", pooler_config={"pooling_type": "STEP", "step_tag_id": tag})
    (out,) = llm.reward({"prompt_token_ids": ids}, use_tqdm=False)
    (hidden,) = hf_last_hidden(model_dir, ["one. two. three."])
    assert_close_f32(out.outputs.data, hidden[torch.tensor(ids) == tag])
    (cols,) = llm.reward({"prompt_token_ids": ids}, PoolingParams(returned_token_ids=[0, 5]), use_tqdm=False)
    assert_close_f32(cols.outputs.data, hidden[torch.tensor(ids) == tag][:, [0, 5]])


@pytest.mark.parametrize("window", [4, 512])
def test_bidirectional_gemma3_embedder_equals_sentence_transformers(window, tmp_path):
    """EmbeddingGemma's shape: a `Gemma3TextModel` body attending both ways (within each local layer's
    window, on both sides: the 4-token one cuts through every text), mean pooling, two Dense projections and
    Normalize, saved by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    config = _config("gemma3", len(build_tokenizer()))
    config.use_bidirectional_attention, config.sliding_window = True, window
    config.architectures = ["Gemma3TextModel"]
    torch.manual_seed(2)
    body = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in body.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    body.save_pretrained(tmp_path / "body")
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.unk_token  # sentence-transformers pads its batches
    tokenizer.save_pretrained(tmp_path / "body")
    body_dir = str(tmp_path / "body")
    st = SentenceTransformer(modules=[Transformer(body_dir, max_seq_length=64), Pooling(64, pooling_mode="mean"),
                                      Dense(64, 96, activation_function=torch.nn.Identity()),
                                      Dense(96, 64, activation_function=torch.nn.Identity()), Normalize()])
    st.save(str(tmp_path / "st"))
    llm = LLM(str(tmp_path / "st"))
    assert not llm.llm_engine.executor.worker.model.is_causal
    assert llm.llm_engine.processor.pooling.sequence_pooling == "MEAN"
    refs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    for out, ref in zip(llm.embed(TEXTS, use_tqdm=False), refs):
        assert_close_f32(out.outputs.embedding, ref)
