"""Prompt embeddings (`EmbedsPrompt`) through the whole engine, against token prompts and transformers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve import LLM, SamplingParams, TokensPrompt

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 100, 200, 150, 7, 9, 33, 21, 17, 5, 6, 120, 77, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module", params=["llama", "opt"])
def setup(request, model_dirs):
    path = model_dirs(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, LLM(path, dtype="float32", enable_prompt_embeds=True)


def embeds_of(hf, ids):
    with torch.no_grad():
        return hf.get_input_embeddings()(torch.tensor(ids))


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_embeddings_of_the_ids_give_the_ids_greedy_tokens_and_transformers(setup):
    path, hf, llm = setup
    by_ids = tokens(llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY, use_tqdm=False))
    by_embeds = llm.generate([{"prompt_embeds": embeds_of(hf, p)} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert tokens(by_embeds) == by_ids
    assert by_embeds[0].prompt_token_ids == [] and by_embeds[0].outputs[0].text
    for prompt, ours in zip(PROMPTS, by_ids):
        with torch.no_grad():
            ref = hf.generate(inputs_embeds=embeds_of(hf, prompt)[None], do_sample=False, max_new_tokens=16,
                              min_new_tokens=16, pad_token_id=0, eos_token_id=None)
        assert ref[0, -16:].tolist() == ours


def test_a_mixed_batch_gives_each_prompt_its_own_output(setup):
    _, hf, llm = setup
    alone = [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in (
        {"prompt_embeds": embeds_of(hf, PROMPTS[1])[None]}, TokensPrompt(prompt_token_ids=PROMPTS[0]),
        "some text prompt")]
    mixed = tokens(llm.generate([{"prompt_embeds": embeds_of(hf, PROMPTS[1])[None]},
                                 TokensPrompt(prompt_token_ids=PROMPTS[0]), "some text prompt"],
                                GREEDY, use_tqdm=False))
    assert mixed == alone


def test_different_embeddings_never_share_cached_blocks(model_dirs):
    path = model_dirs("llama")
    llm = LLM(path, dtype="float32", enable_prompt_embeds=True, block_size=4)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(12, 64, generator=g) for _ in range(2))
    out_a = llm.generate({"prompt_embeds": a}, GREEDY, use_tqdm=False)[0]
    out_b = llm.generate({"prompt_embeds": b}, GREEDY, use_tqdm=False)[0]
    again_a = llm.generate({"prompt_embeds": a}, GREEDY, use_tqdm=False)[0]
    assert out_b.num_cached_tokens == 0 and again_a.num_cached_tokens == 0
    assert out_a.outputs[0].token_ids != out_b.outputs[0].token_ids
    assert again_a.outputs[0].token_ids == out_a.outputs[0].token_ids


def test_preemption_keeps_the_embeddings(model_dirs):
    path = model_dirs("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [{"prompt_embeds": embeds_of(hf, p)} for p in PROMPTS * 2]
    roomy = LLM(path, dtype="float32", enable_prompt_embeds=True)
    tight = LLM(path, dtype="float32", enable_prompt_embeds=True, num_gpu_blocks_override=6, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = tokens(roomy.generate(prompts, params, use_tqdm=False))
    assert tokens(tight.generate(prompts, params, use_tqdm=False)) == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0


def test_prompt_embeds_are_validated_before_anything_is_queued(model_dirs):
    path = model_dirs("llama")
    plain = LLM(path, dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
        plain.generate({"prompt_embeds": torch.randn(4, 64)}, use_tqdm=False)
    llm = LLM(path, dtype="float32", max_model_len=32, enable_prompt_embeds=True)
    bad = [
        (torch.randn(4, 32), "hidden size"),
        (torch.randn(40, 64), "maximum model length of 32"),
        (torch.randn(0, 64), "empty|length 0|at least one"),
        (torch.randn(64), "rank|dimensions|shape"),
        (torch.ones(4, 64, dtype=torch.long), "float"),
        (torch.full((4, 64), float("nan")), "NaN|finite"),
        (torch.randn(4, 64).to_sparse(), "sparse|dense|strided"),
        ([[0.0] * 64], "must be a single torch.Tensor"),
    ]
    for value, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            llm.generate(["fine", {"prompt_embeds": value}], use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate({"prompt_embeds": torch.randn(4, 64)}, SamplingParams(prompt_logprobs=1), use_tqdm=False)
    out = llm.generate({"prompt_embeds": torch.randn(4, 64, dtype=torch.float16)},
                       SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3  # cast to the model dtype, and still serving
