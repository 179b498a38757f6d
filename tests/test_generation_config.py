"""A model's generation_config.json sets the sampling defaults for what a request leaves out, as in vLLM
(`generation_config="auto"`); "vllm" keeps vLLM's own; a folder or `override_generation_config` replaces them.
Explicit SamplingParams are used as given."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import TEMPLATE

from shardserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Hello, world!", "def add(a, b):"]
# top_k=1 makes sampling at any temperature pick the best token: the outputs can be compared exactly.
MODEL_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_k": 1, "repetition_penalty": 1.5,
                  "max_new_tokens": 5}


@pytest.fixture(scope="module")
def path(model_dirs, tmp_path_factory):
    """The llama test model with a generation config: its defaults, and one more EOS id."""
    path = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(model_dirs("llama"), path)
    (path / "generation_config.json").write_text(json.dumps(MODEL_DEFAULTS | {"eos_token_id": [2, 7]}))
    return str(path)


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_the_model_defaults_fill_what_generate_and_chat_leave_out(path):
    llm = LLM(path, max_model_len=128, chat_template=TEMPLATE)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.repetition_penalty, defaults.max_tokens) == \
        (0.7, 1, 1.5, 5)
    assert (defaults.top_p, defaults.min_p, defaults.presence_penalty) == (1.0, 0.0, 0.0)  # not in the file
    explicit = SamplingParams(temperature=0.7, top_k=1, repetition_penalty=1.5, max_tokens=5)
    expected = _ids(llm.generate(PROMPTS, explicit, use_tqdm=False))
    assert _ids(llm.generate(PROMPTS, use_tqdm=False)) == expected
    assert all(len(ids) <= 5 for ids in expected)
    # Explicit parameters are taken as given: no repetition penalty, 8 tokens.
    plain = _ids(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False))
    assert all(len(ids) == 8 for ids in plain)
    messages = [{"role": "user", "content": "Hi there"}]
    assert _ids(llm.chat(messages, use_tqdm=False)) == _ids(llm.chat(messages, explicit, use_tqdm=False))
    assert 7 in llm.llm_engine.processor.eos_token_ids  # the generation config's EOS ids count too


def test_vllm_keeps_its_own_defaults_and_overrides_go_on_top(path, tmp_path):
    assert LLM(path, max_model_len=128, generation_config="vllm").get_default_sampling_params() == SamplingParams()
    llm = LLM(path, max_model_len=128, generation_config="vllm", override_generation_config={"max_new_tokens": 3})
    assert llm.get_default_sampling_params() == SamplingParams(max_tokens=3)
    assert all(len(ids) <= 3 for ids in _ids(llm.generate(PROMPTS, use_tqdm=False)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "min_p": 0.1}))
    llm = LLM(path, max_model_len=128, generation_config=str(other), override_generation_config={"top_p": 0.9})
    assert llm.get_default_sampling_params() == SamplingParams(top_p=0.9, min_p=0.1)
