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
        assert all(s.finish_reason is None for s in out.sequences)  # vLLM's: only an EOS beam says "stop"
        assert out.sequences[0].text == llm.get_tokenizer().decode(out.sequences[0].tokens, skip_special_tokens=True)


def test_width_one_is_greedy(llm):
    greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                            BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True))
    for prompt, g, b in zip(PROMPTS, greedy, beams):
        assert b.sequences[0].tokens == prompt + g.outputs[0].token_ids


def test_concurrency_limit_takes_prompts_in_groups(llm):
    """vLLM's concurrency_limit: one prompt's beams at a time give the same beams as all at once, and no step
    then holds more than one prompt's beams."""
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    together = llm.beam_search(prompts, params)
    seen = _recording_steps(llm)
    try:
        apart = llm.beam_search(prompts, params, concurrency_limit=1)
    finally:
        del llm.llm_engine.executor.execute_model  # the recording wrapper: back to the class's method
    assert [[s.tokens for s in o.sequences] for o in apart] == [[s.tokens for s in o.sequences] for o in together]
    assert max(len(s.scheduled) for s in seen) <= params.beam_width
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(prompts, params, concurrency_limit=0)


def _recording_steps(llm) -> list:
    """The scheduler outputs the engine runs, recorded as they go to the executor."""
    executor, seen = llm.llm_engine.executor, []
    run = executor.execute_model

    def record(sched):
        seen.append(sched)
        return run(sched)
    executor.execute_model = record
    return seen


def test_beams_fork_their_kv_and_compute_one_token_each(path):
    """After the prompts' prefill every step computes exactly one token per live beam: extensions fork the
    KV blocks of the beam they extend (partial last blocks copied), and everything is freed at the end."""
    llm = LLM(path, dtype="float32", block_size=4)
    engine = llm.llm_engine
    seen = _recording_steps(llm)
    outs = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    steps = [s for s in seen if s.scheduled]
    assert steps[0].num_batched_tokens == sum(len(p) for p in PROMPTS)
    # step 2 extends 1 beam per prompt into up to 4; later steps run 4 beams per prompt
    assert [s.num_batched_tokens for s in steps[1:]] == [8] * 5
    assert any(s.blocks_to_copy for s in steps)
    assert not engine.scheduler.held
    manager = engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not manager.req_blocks
    # the same beams as stepping with one-token generate calls (vLLM's way, through the prefix cache)
    from shardserve.beam_search import run_beam_search

    def generate(beams, params):
        outs = llm.generate([TokensPrompt(prompt_token_ids=b.tokens) for b in beams], params, use_tqdm=False)
        return [o.outputs[0].logprobs[0] for o in outs]
    ref = run_beam_search(generate, PROMPTS, BeamSearchParams(beam_width=4, max_tokens=6,
                                                                                ignore_eos=True),
                          llm.get_tokenizer(), engine.max_model_len)
    for a, b in zip(outs, ref):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert [s.cum_logprob for s in a.sequences] == pytest.approx([s.cum_logprob for s in b.sequences], abs=1e-5)


def test_beams_in_a_small_kv_cache(path, hf):
    """With few KV blocks, beams give up the blocks they hold and recompute (through the prefix cache); the
    beams still equal transformers' and every block comes back."""
    llm = LLM(path, dtype="float32", block_size=4, num_gpu_blocks_override=12, max_model_len=32)
    seen = _recording_steps(llm)
    outs = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True))
    one_token_per_beam = sum(len(p) for p in PROMPTS) + 8 + 8 * (MAX_TOKENS - 2)
    assert sum(s.num_batched_tokens for s in seen) > one_token_per_beam  # some beams recomputed
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=4, num_return_sequences=4,
                              max_new_tokens=MAX_TOKENS, pad_token_id=0, early_stopping=True)
        assert [s.tokens for s in out.sequences] == ref.tolist()
    manager = llm.llm_engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.llm_engine.scheduler.held


def test_async_engine_beams_fork_and_free_their_blocks(path):
    """The server's beam search: the same forking steps on the async engine's thread give the offline beams,
    and every held block is released."""
    import asyncio

    from shardserve.beam_search import AsyncEngineBeamStepper, run_beam_search
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import AsyncLLMEngine

    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    expected = LLM(path, dtype="float32", block_size=4).beam_search([TokensPrompt(prompt_token_ids=p)
                                                                      for p in PROMPTS], params)
    engine = AsyncLLMEngine(EngineConfig(model=path, dtype="float32", block_size=4))

    async def search():
        stepper = AsyncEngineBeamStepper(engine, asyncio.get_running_loop())

        def run():
            try:
                return run_beam_search(stepper, PROMPTS, params, engine.engine.tokenizer, engine.max_model_len)
            finally:
                stepper.close()
        return await asyncio.to_thread(run)
    try:
        got = asyncio.run(search())
        for g, e in zip(got, expected):
            assert [s.tokens for s in g.sequences] == [s.tokens for s in e.sequences]
        asyncio.run(_drain(engine))  # the release is a command: let the engine thread apply it
        manager = engine.engine.scheduler.block_manager
        assert not engine.engine.scheduler.held and manager.num_free_blocks == manager.num_blocks
    finally:
        engine.shutdown()


async def _drain(engine) -> None:
    """One more request through the engine: every command queued before it has been applied."""
    async for _ in engine.generate(TokensPrompt(prompt_token_ids=[1, 2, 3]), SamplingParams(max_tokens=1)):
        pass


def test_beams_wider_than_max_logprobs_allows_are_refused_up_front(llm, path):
    """A step asks for 2 x beam_width logprobs, which max_logprobs (default 20) caps as for any request."""
    prompts = [TokensPrompt(prompt_token_ids=PROMPTS[0])]
    with pytest.raises(ValueError, match="beam_width=11 needs 22 logprobs a step, more than max_logprobs=20"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=11, max_tokens=2))
    wide = LLM(path, dtype="float32", block_size=4, max_logprobs=22)
    (out,) = wide.beam_search(prompts, BeamSearchParams(beam_width=11, max_tokens=2, ignore_eos=True))
    assert len(out.sequences) == 11
