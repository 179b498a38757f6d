"""The server's engine: a request never waits on an engine that has died."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shardserve import SamplingParams, TokensPrompt


def test_a_stream_waiting_on_a_hung_step_gets_the_error_once_the_engine_is_found_dead(model_dirs):
    """A step that never returns (a worker hung or gone) is found out by a health check, which marks the
    engine dead; the requests waiting on that step then fail with EngineDeadError instead of hanging, and the
    loop's watch timer stops once no stream is left on it."""
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import WATCH_INTERVAL_S, AsyncLLMEngine, EngineDeadError

    engine = AsyncLLMEngine(EngineConfig(model=model_dirs("llama"), dtype="float32"))
    real_step, stepping, release = engine.engine.step, threading.Event(), threading.Event()

    def hung_step():
        stepping.set()
        release.wait()
        return []
    engine.engine.step = hung_step

    async def wait_on_the_hung_step():
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        stream = engine.generate(TokensPrompt(prompt_token_ids=[5, 9, 14]), params)
        consumer = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(stepping.wait, 10)
        engine.error = RuntimeError("worker ping failed")  # what check_health(ping_workers=True) records
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker ping failed"):
            async with asyncio.timeout(5 * WATCH_INTERVAL_S):  # a hang fails the test rather than blocking it
                await consumer
        waited = time.monotonic() - started
        await asyncio.sleep(2 * WATCH_INTERVAL_S)
        return waited, len(engine._watched)

    try:
        waited, watched = asyncio.run(wait_on_the_hung_step())
        assert waited <= 2 * WATCH_INTERVAL_S
        assert watched == 0
    finally:
        engine.engine.step = real_step
        release.set()
        engine.shutdown()


def test_a_consumer_that_falls_behind_gets_the_newest_output_not_a_backlog(model_dirs):
    """Outputs are cumulative: while the consumer is away the engine's newer outputs replace the one it has not
    taken (vLLM's output collector), so it catches up in one step with the same tokens as one that kept up."""
    from shardserve import LLM
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import AsyncLLMEngine

    path = model_dirs("llama")
    prompt = TokensPrompt(prompt_token_ids=[5, 9, 14])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = list(LLM(path, dtype="float32").generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    engine = AsyncLLMEngine(EngineConfig(model=path, dtype="float32"))

    async def slow_consumer():
        seen = []
        async for out in engine.generate(prompt, params):
            seen.append(list(out.outputs[0].token_ids))
            if len(seen) == 1:  # away until the engine has made every token
                while engine.engine.has_unfinished_requests():
                    await asyncio.sleep(0.01)
        return seen, out.finished
    try:
        seen, finished = asyncio.run(slow_consumer())
    finally:
        engine.shutdown()
    assert finished
    assert seen == [expected[:1], expected]


def test_a_delta_consumer_that_falls_behind_gets_what_it_missed_in_one_output(model_dirs):
    """DELTA outputs are not replaced while the consumer is away but folded together (vLLM's output
    collector): it catches up in one output holding every token it missed."""
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import AsyncLLMEngine
    from shardserve.sampling_params import RequestOutputKind

    prompt = TokensPrompt(prompt_token_ids=[5, 9, 14])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine = AsyncLLMEngine(EngineConfig(model=model_dirs("llama"), dtype="float32"))

    async def consume(kind, slow):
        seen = []
        async for out in engine.generate(prompt, params.clone(output_kind=kind)):
            seen.append((list(out.outputs[0].token_ids), out.outputs[0].text))
            if slow and len(seen) == 1:  # away until the engine has made every token
                while engine.engine.has_unfinished_requests():
                    await asyncio.sleep(0.01)
        return seen, out.finished
    try:
        cumulative, _ = asyncio.run(consume(RequestOutputKind.CUMULATIVE, False))
        seen, finished = asyncio.run(consume(RequestOutputKind.DELTA, True))
    finally:
        engine.shutdown()
    expected_ids, expected_text = cumulative[-1]
    assert finished and len(seen) == 2 and len(expected_ids) == 16
    assert seen[0][0] + seen[1][0] == expected_ids and seen[0][1] + seen[1][1] == expected_text


def test_generate_checks_at_once_and_queues_only_what_is_read(model_dirs):
    """`generate` raises on bad input when called; the request is queued when its stream is first read, so a
    stream left unread (a later prompt of the same call was refused) costs the engine nothing."""
    from shardserve.config import EngineConfig
    from shardserve.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(EngineConfig(model=model_dirs("llama"), dtype="float32", max_model_len=64))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def call():
        unread = engine.generate(TokensPrompt(prompt_token_ids=[5, 9, 14]), params)
        with pytest.raises(ValueError):
            engine.generate(TokensPrompt(prompt_token_ids=[5] * 100), params)  # longer than max_model_len
        await unread.aclose()
        read = [out async for out in engine.generate(TokensPrompt(prompt_token_ids=[5, 9, 14]), params)]
        return read
    try:
        read = asyncio.run(call())
        assert read[-1].finished and len(read[-1].outputs[0].token_ids) == 4
        assert engine.num_steps == 4  # the read request's steps only: the unread one never ran
        assert not engine._streams and not engine.engine.has_unfinished_requests()
    finally:
        engine.shutdown()
