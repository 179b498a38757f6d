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
