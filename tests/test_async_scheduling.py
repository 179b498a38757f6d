"""Async scheduling: each step is scheduled and launched before the engine reads the step in flight, a decode's
input token taken from the device. On a CPU nothing overlaps, but every piece of the bookkeeping runs
(`async_scheduling=True` forces it there): its outputs must be the step-by-step engine's, token for token."""
from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request
from shardserve.engine.scheduler import PLACEHOLDER, Scheduler

PROMPTS = [[1] + [(7 * i + 3 * j) % 300 + 4 for j in range(n)] for i, n in enumerate([5, 40, 17, 3, 60, 9, 22, 31])]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=90, ignore_eos=True),   # up to max_model_len (96)
        SamplingParams(temperature=0.8, seed=3, max_tokens=25, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=5),
        SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=5),
        SamplingParams(temperature=0, max_tokens=40, stop=["a", "e"], include_stop_str_in_output=True),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=30, seed=11),  # (unseeded draws depend
        # on which rows share a step, which overlapping changes)
        SamplingParams(temperature=0, max_tokens=7),
    ]


def _outputs(llm: LLM, params: list[SamplingParams]) -> list:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              c.logprobs and [{t: round(lp.logprob, 4) for t, lp in pos.items()} for pos in c.logprobs])
             for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def engines(model_dirs):
    """The same small engine step by step and with async scheduling: a KV cache of 12 blocks of 16 for 8
    requests of up to 96 tokens, so requests are preempted (and readmitted) with tokens in flight."""
    kwargs = dict(dtype="float32", max_num_seqs=8, max_model_len=96, num_gpu_blocks_override=12, seed=0)
    return (LLM(model_dirs("llama"), async_scheduling=False, **kwargs),
            LLM(model_dirs("llama"), async_scheduling=True, **kwargs))


def test_async_scheduling_gives_what_step_by_step_gives(engines):
    sync, overlapped = engines
    assert not sync.llm_engine.async_scheduling and overlapped.llm_engine.async_scheduling
    engine = overlapped.llm_engine
    launched_in_flight = []
    launch = engine.executor.launch_model

    def spy(sched):  # was the step before still unread when this one was launched?
        launched_in_flight.append(engine._in_flight is not None)
        return launch(sched)

    engine.executor.launch_model = spy
    try:
        expected, got = _outputs(sync, _params()), _outputs(overlapped, _params())
    finally:
        del engine.executor.launch_model
    assert got == expected
    assert sum(launched_in_flight) > 20  # steps really overlapped
    assert engine.scheduler.num_preemptions > 0 and sync.llm_engine.scheduler.num_preemptions > 0
    # nothing left behind: no step in flight, every block free, no request state in the worker
    assert engine._in_flight is None
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
    assert not engine.executor.worker.runner.requests
    finishes = [c[2] for o in got for c in o]
    assert {"length", "stop"} <= set(finishes)
    long = got[1][0]
    assert long[2] == "length" and len(PROMPTS[1]) + len(long[0]) == 96  # max_model_len, no token past it


def test_a_request_that_reads_its_outputs_runs_step_by_step(engines):
    """Penalties read the request's own tokens on the host: while one runs, steps do not overlap (the step in
    flight is read first), and the batch's outputs stay the step-by-step engine's."""
    sync, overlapped = engines
    params = _params()
    params[6] = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5)
    assert _outputs(overlapped, params) == _outputs(sync, params)


def test_abort_with_a_step_in_flight(engines):
    sync, overlapped = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for llm in engines:
        engine = llm.llm_engine
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
        tokens = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
                if out.request_id == "1" and len(out.outputs[0].token_ids) == 3:
                    engine.abort_request("1")
        results[llm is overlapped] = tokens
        assert not engine.scheduler.running and not engine.scheduler.waiting
    assert results[True] == results[False]
    assert len(results[True]["1"]) == 3 and all(len(results[True][k]) == 12 for k in "023")
    # the next batch starts clean: the aborted request's state is gone from the worker once a step tells it
    assert _outputs(overlapped, _params()) == _outputs(sync, _params())
    assert not overlapped.llm_engine.executor.worker.runner.requests


def test_scheduler_hands_out_placeholders_for_tokens_in_flight():
    """Scheduled again before the engine has read its last token, a decode computes a placeholder; one whose
    last token (max_tokens) is in flight waits; a preempted one with a token in flight is not readmitted."""
    scheduler = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    scheduler.add_request(req)
    first = scheduler.schedule().scheduled[0]
    assert first.token_ids == [1, 2, 3] and first.sample and req.num_output_placeholders == 1
    second = scheduler.schedule().scheduled[0]   # the first step's token not read yet
    assert second.token_ids == [PLACEHOLDER] and second.num_computed_tokens == 3 and second.sample
    assert req.num_output_placeholders == 2
    req.append_token(9)                          # the engine reads the first step's token
    req.num_output_placeholders -= 1
    third = scheduler.schedule().scheduled[0]
    assert third.token_ids == [PLACEHOLDER] and third.num_computed_tokens == 4
    assert scheduler.schedule().is_empty         # 1 read + 2 in flight = max_tokens: nothing more to compute
    scheduler._preempt(req)
    assert scheduler.schedule().is_empty         # its tokens in flight must be read before it recomputes
    req.num_output_placeholders = 0
    again = scheduler.schedule().scheduled[0]
    assert again.token_ids == [1, 2, 3, 9] and again.num_computed_tokens == 0


def test_the_servers_engine_streams_the_same_tokens(model_dirs, engines):
    """The online engine's loop over an overlapping engine: concurrent streams, one aborted by its client midway,
    each stream's tokens the step-by-step engine's, and the engine left with nothing in flight."""
    import asyncio

    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import AsyncLLMEngine

    sync, _ = engines
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 17, 30, 9)]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS[:4]]
    expected = [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]
    server = AsyncLLMEngine(EngineConfig(model=model_dirs("llama"), dtype="float32", max_model_len=96,
                                         async_scheduling=True))
    assert server.engine.async_scheduling

    async def stream(prompt, p, stop_after=None):
        seen = []
        async for out in server.generate(prompt, p):
            seen = list(out.outputs[0].token_ids)
            if stop_after is not None and len(seen) >= stop_after:
                break  # the client goes away: the request is aborted
        return seen

    async def run():
        return await asyncio.gather(*(stream(pr, p) for pr, p in zip(prompts, params)),
                                    stream(prompts[2], params[2], stop_after=4))
    try:
        *streamed, cut = asyncio.run(run())
        assert streamed == expected
        assert cut == expected[2][:len(cut)] and 4 <= len(cut) < 30
        assert server.engine._in_flight is None  # the last step's reading waited out the one launched after it
    finally:
        server.shutdown()


def test_where_async_scheduling_is_on(model_dirs, encoder_dirs):
    """By default only on a GPU (a CPU's forward runs on the engine's own thread: nothing to overlap); never for a
    pooling model, whose steps sample nothing."""
    import torch

    assert LLM(model_dirs("llama"), dtype="float32").llm_engine.async_scheduling == torch.cuda.is_available()
    assert not LLM(encoder_dirs("bert"), async_scheduling=True).llm_engine.async_scheduling
