"""How a pooling model pools, and what a request may ask: Sentence Transformers files over the
architecture's default, `pooler_config` over both, named prompts, Matryoshka dimensions, `use_activation`,
truncation; and bad requests refused up front while the engine keeps serving.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from conftest import assert_close_f32
from shardserve import LLM, PoolerConfig, PoolingParams, TokensPrompt

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
         "The capital of France is Paris, and the capital of Italy is Rome."]
PROMPTS = {"query": "query: find ", "passage": "passage: "}


@pytest.fixture(scope="module")
def st_dir(encoder_dirs, tmp_path_factory):
    """A Sentence Transformers model saved by sentence-transformers itself around the random BERT: MEAN
    pooling (BERT's own default would be CLS), a Dense projection 64 -> 32 (tanh), Normalize, two prompts."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    torch.manual_seed(0)
    st = SentenceTransformer(modules=[Transformer(encoder_dirs("bert"), max_seq_length=32),
                                      Pooling(64, pooling_mode="mean"), Dense(64, 32), Normalize()],
                             prompts=PROMPTS)
    path = tmp_path_factory.mktemp("st-bert")
    st.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def st_model(st_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(st_dir, device="cpu")


def test_sentence_transformers_pipeline_and_prompts(st_dir, st_model):
    llm = LLM(st_dir)
    pooling = llm.llm_engine.processor.pooling
    assert pooling.sequence_pooling == "MEAN" and llm.llm_engine.max_model_len == 32
    for out, ref in zip(llm.embed(TEXTS, use_tqdm=False), st_model.encode(TEXTS, convert_to_tensor=True)):
        assert out.outputs.hidden_size == 32
        assert_close_f32(out.outputs.embedding, ref)
    # A named prompt from config_sentence_transformers.json goes before the text, as in ST's encode.
    refs = st_model.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    for out, ref in zip(llm.embed(TEXTS, prompt_name="query", use_tqdm=False), refs):
        assert_close_f32(out.outputs.embedding, ref)
    with pytest.raises(ValueError, match="Unknown prompt name 'doc'.*its prompts are .*'passage', 'query'"):
        llm.embed(TEXTS, prompt_name="doc")
    with pytest.raises(ValueError, match="named prompt applies to text prompts"):
        llm.embed(TokensPrompt(prompt_token_ids=[2, 50, 3]), prompt_name="query")


def test_pooler_config_overrides_sentence_transformers(st_dir, st_model):
    """pooler_config (here as the CLI's JSON string) beats modules.json: CLS, no normalisation; the Dense
    layer from the Sentence Transformers folder still applies."""
    llm = LLM(st_dir, pooler_config='{"pooling_type": "CLS", "normalize": false}')
    assert llm.llm_engine.processor.pooling.sequence_pooling == "CLS"
    dense = st_model[2]
    for out, text in zip(llm.embed(TEXTS, use_tqdm=False), TEXTS):
        tokens = st_model.encode(text, output_value="token_embeddings", convert_to_tensor=True)
        with torch.no_grad():
            expected = dense.activation_function(dense.linear(tokens[0]))
        assert_close_f32(out.outputs.embedding, expected)
    # override_pooler_config, vLLM's older name, with a PoolerConfig
    llm = LLM(st_dir, override_pooler_config=PoolerConfig(pooling_type="MEAN", normalize=False))
    refs = F.normalize(torch.as_tensor(llm.embed(TEXTS, use_tqdm=False)[0].outputs.embedding), dim=0)
    assert_close_f32(refs, st_model.encode(TEXTS[0], convert_to_tensor=True))
    with pytest.raises(ValueError, match="Unknown pooler_config field"):
        LLM(st_dir, pooler_config={"pooling": "CLS"})


def test_matryoshka_dimensions(encoder_dirs):
    model_dir = encoder_dirs("bert")
    with pytest.raises(ValueError) as error:
        LLM(model_dir).embed("hello", PoolingParams(dimensions=16), use_tqdm=False)
    assert str(error.value) == (f'Model "{model_dir}" does not support matryoshka representation, changing output '
                                f'dimensions will lead to poor results.')
    llm = LLM(model_dir, hf_overrides={"is_matryoshka": True})
    (full,) = llm.embed(TEXTS[0], PoolingParams(use_activation=False), use_tqdm=False)
    (cut,) = llm.embed(TEXTS[0], PoolingParams(dimensions=16), use_tqdm=False)
    assert_close_f32(cut.outputs.embedding, F.normalize(torch.tensor(full.outputs.embedding[:16]), dim=0))
    listed = LLM(model_dir, hf_overrides={"matryoshka_dimensions": [16, 32]})
    assert len(listed.embed("hello", PoolingParams(dimensions=32), use_tqdm=False)[0].outputs.embedding) == 32
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        listed.embed("hello", PoolingParams(dimensions=8), use_tqdm=False)
    # a default width from pooler_config
    narrow = LLM(model_dir, hf_overrides={"is_matryoshka": True}, pooler_config={"dimensions": 16})
    assert_close_f32(narrow.embed(TEXTS[0], use_tqdm=False)[0].outputs.embedding, cut.outputs.embedding)


def test_truncation(encoder_dirs):
    model_dir = encoder_dirs("bert")
    llm = LLM(model_dir, max_model_len=16)
    long_text = " ".join(TEXTS * 3)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(long_text)["input_ids"]
    assert len(ids) > 16
    with pytest.raises(ValueError, match=rf"maximum context length is 16 tokens. However, your prompt contains "
                                         rf"{len(ids)} input tokens"):
        llm.embed({"prompt_token_ids": ids}, use_tqdm=False)
    # a text of more characters than 16 of the vocabulary's longest tokens: refused before it is tokenized (vLLM)
    with pytest.raises(ValueError, match=rf"your prompt contains {len(long_text)} characters \(more than"):
        llm.embed(long_text, use_tqdm=False)
    # -1: to the model's length, as the tokenizer truncates ([CLS] ... [SEP] kept)
    (out,) = llm.encode(long_text, PoolingParams(use_activation=False), pooling_task="token_embed",
                        truncate_prompt_tokens=-1, use_tqdm=False)
    truncated = tokenizer(long_text, truncation=True, max_length=16)["input_ids"]
    assert out.prompt_token_ids == truncated and truncated[-1] == tokenizer.sep_token_id
    with torch.no_grad():
        expected = AutoModel.from_pretrained(model_dir)(torch.tensor([truncated])).last_hidden_state[0]
    assert_close_f32(out.outputs.data, expected)
    # k on token ids: the first k, the side the tokenizer cuts on
    (cut,) = llm.embed(TokensPrompt(prompt_token_ids=ids), PoolingParams(truncate_prompt_tokens=5), use_tqdm=False)
    (head,) = llm.embed(TokensPrompt(prompt_token_ids=ids[:5]), use_tqdm=False)
    assert cut.prompt_token_ids == ids[:5]
    assert_close_f32(cut.outputs.embedding, head.outputs.embedding)
    # truncation_side="left" keeps the last tokens, as a tokenizer built to cut on the left does
    left_tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    (tail,) = llm.embed(long_text, PoolingParams(truncate_prompt_tokens=10, truncation_side="left"), use_tqdm=False)
    expected_ids = left_tokenizer(long_text, truncation=True, max_length=10)["input_ids"]
    assert tail.prompt_token_ids == expected_ids and expected_ids[0] == tokenizer.cls_token_id
    assert expected_ids[-2] == ids[-2]
    (cut,) = llm.embed(TokensPrompt(prompt_token_ids=ids), PoolingParams(truncate_prompt_tokens=5,
                                                                         truncation_side="left"), use_tqdm=False)
    assert cut.prompt_token_ids == ids[-5:]
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
        PoolingParams(truncation_side="middle")
    with pytest.raises(ValueError, match="truncate_prompt_tokens=17 cannot be greater than max_model_len = 16"):
        llm.embed(long_text, truncate_prompt_tokens=17, use_tqdm=False)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(encoder_dirs):
    llm = LLM(encoder_dirs("bert"), max_model_len=32)
    engine = llm.llm_engine
    vocab = engine.processor.vocab_size
    with pytest.raises(ValueError, match="normalize=...\\) has been removed; use use_activation"):
        PoolingParams(normalize=True)
    with pytest.raises(ValueError, match="Dimensions must be greater than 0"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1"):
        PoolingParams(truncate_prompt_tokens=0)
    cases = [
        (lambda: llm.embed(["fine", "x " * 40], use_tqdm=False), ValueError, "maximum context length is 32 tokens"),
        (lambda: llm.embed(["fine", ""], use_tqdm=False), ValueError, "cannot be empty"),
        (lambda: llm.embed(["fine", TokensPrompt(prompt_token_ids=[2, vocab])], use_tqdm=False), ValueError,
         "out of vocabulary"),
        (lambda: llm.embed(["fine", 42], use_tqdm=False), TypeError, "prompt must be"),
        (lambda: llm.embed(["fine", "ok"], [PoolingParams()], use_tqdm=False), ValueError, "1 PoolingParams for 2"),
        (lambda: llm.encode("fine", PoolingParams(dimensions=8), pooling_task="token_classify", use_tqdm=False),
         ValueError, "does not serve the 'token_classify'"),
        (lambda: llm.embed("fine", PoolingParams(task="classify"), use_tqdm=False), ValueError,
         "task='classify'\\) given to a call for the 'embed' task"),
        (lambda: llm.embed({"prompt_embeds": torch.zeros(3, 64)}, use_tqdm=False), ValueError,
         "not prompt embeddings"),
        (lambda: llm.embed("fine", prompt_name="query", use_tqdm=False), ValueError, "defines no prompts"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert not engine.has_unfinished_requests() and not engine.scheduler.requests
    (out,) = llm.embed("still serving", use_tqdm=False)
    assert len(out.outputs.embedding) == 64


def test_classification_params_are_checked_per_task(encoder_dirs):
    llm = LLM(encoder_dirs("bert", "classify", num_labels=3))
    with pytest.raises(ValueError, match=r"Task classify only supports \['use_activation'\] parameters, does not "
                                         r"support \['dimensions'\]"):
        llm.classify("hello", PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="need STEP pooling"):
        llm.encode("hello", PoolingParams(step_tag_id=5), pooling_task="token_classify", use_tqdm=False)
