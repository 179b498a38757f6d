"""Bad input is refused with a message naming the value and the limit, and the engine keeps serving."""
from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams, TokensPrompt


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(model_dirs("llama"), dtype="float32", max_model_len=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n must be"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    (dict(stream_interval=0), "stream_interval"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_before_anything_is_queued(llm):
    vocab = llm.llm_engine.processor.vocab_size
    cases = [
        ("x " * 200, ValueError, r"maximum context length is 64 tokens. However, your prompt contains \d+ input"),
        ("x" * 10**7, ValueError, r"contains 10000000 characters \(more than"),   # refused before tokenizing
        ("", ValueError, "cannot be empty"),
        (TokensPrompt(prompt_token_ids=[]), ValueError, "cannot be empty"),
        (TokensPrompt(prompt_token_ids=[1, vocab + 5]), ValueError, f"Token id {vocab + 5} is out of vocabulary"),
        (TokensPrompt(prompt_token_ids=[1, -1]), ValueError, "Token id -1"),
        (12345, TypeError, "prompt must be"),
    ]
    for prompt, error, message in cases:
        # A good prompt in the same call must not be left queued by the bad one.
        with pytest.raises(error, match=message):
            llm.generate(["fine prompt", prompt], SamplingParams(max_tokens=2), use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate("hi", SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["hi"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    out = llm.generate("still serving", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_model_directories(tmp_path, model_dirs):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))
    src = model_dirs("llama")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_text(open(f"{src}/{name}").read())
    with pytest.raises(ValueError, match="No weights"):
        LLM(str(no_weights))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(open(f"{src}/config.json").read().replace(
        '"LlamaForCausalLM"', '"FancyForCausalLM"'))
    with pytest.raises(ValueError, match="not supported; supported architectures: .*LlamaForCausalLM"):
        LLM(str(unknown))


def test_max_model_len_beyond_the_model_is_refused(model_dirs):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(model_dirs("llama"), max_model_len=100_000)
