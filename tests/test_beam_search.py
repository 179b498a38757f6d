"""`LLM.beam_search` against transformers' `generate(num_beams=k)` on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve import LLM, BeamSearchParams, SamplingParams, TokensPrompt

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 100, 200, 150, 7, 9, 33, 21, 17, 5, 6, 120, 77, 8, 9, 10, 11, 12, 13]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def path(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def hf(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # EOS cannot fire: every beam runs to max_tokens
    return model


@pytest.mark.parametrize("beam_width", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_best_beams_match_transformers(llm, hf, beam_width, length_penalty):
    outs = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           BeamSearchParams(beam_width=beam_width, max_tokens=MAX_TOKENS, ignore_eos=True,
                                            length_penalty=length_penalty))
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=beam_width,
                              num_return_sequences=beam_width, max_new_tokens=MAX_TOKENS, pad_token_id=0,
                              length_penalty=length_penalty, early_stopping=True, output_scores=True,
                              return_dict_in_generate=True)
        assert len(out.sequences) == beam_width
        assert out.sequences[0].tokens == ref.sequences[0].tolist()
        assert [s.tokens for s in out.sequences] == ref.sequences.tolist()
        if beam_width > 1:  # transformers reports a score only for beam search proper
            # transformers divides the sum of logprobs by the generated length ** length_penalty
            expected = ref.sequences_scores.tolist()
            ours = [s.cum_logprob / MAX_TOKENS ** length_penalty for s in out.sequences]
            assert ours == pytest.approx(expected, abs=1e-4)
        assert all(s.finish_reason == "length" for s in out.sequences)
        assert out.sequences[0].text == llm.get_tokenizer().decode(out.sequences[0].tokens, skip_special_tokens=True)


def test_width_one_is_greedy(llm):
    greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                            BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, g, b in zip(PROMPTS, greedy, beams):
        assert b.sequences[0].tokens == prompt + g.outputs[0].token_ids


def test_beams_share_the_prompts_kv_blocks(path):
    """Each step's beams of a prompt hit the blocks their common prefix already fills, so a step computes only
    the tokens in which beams differ."""
    llm = LLM(path, dtype="float32", block_size=4)
    stats = llm.llm_engine.scheduler.block_manager.stats
    prompt = PROMPTS[1]  # 19 tokens: 4 full blocks
    llm.beam_search([TokensPrompt(prompt_token_ids=prompt)], BeamSearchParams(beam_width=4, max_tokens=6,
                                                                                ignore_eos=True))
    prompt_blocks = len(prompt) // 4
    # Steps 2..6 run 4 beams each; every beam finds at least the prompt's full blocks cached.
    assert stats.hits >= 5 * 4 * prompt_blocks * 4
    assert stats.hits / stats.queries > 0.6
