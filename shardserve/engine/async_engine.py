"""The engine for servers: steps in a background thread while requests are in flight, and streams each
request's outputs to an async iterator.

Callers on the event loop validate and tokenize at once (bad input raises before anything is queued),
then hand the made requests to the stepping thread, which alone touches the engine's state. A step runs
off the event loop, so the server keeps answering while the model computes. The engine is also built in
that thread: OpenMP keeps one thread pool per calling thread, and a model that is loaded in one thread
and run in another computes up to ~2.5x slower on the CPU. A request whose consumer
goes away (client disconnect, cancelled task) is aborted. The engine's outputs are cumulative, so a consumer
that falls behind (a slow client, a busy loop) is handed only the newest output, not a backlog: it catches up
in one chunk, as with vLLM's output collector. If a step fails (a dead worker), every request
in flight gets the error and the engine reports itself unhealthy for good; so do the requests waiting on a
step that hangs, once a health check has found the engine dead (a timer per event loop looks once a second).

`hand_off`: on a CPU whose every core the model's threads use, the server's event loop has no core of its
own, and whatever it does during a forward pass preempts one of the model's OpenMP threads while the others
wait for it at the next barrier. With `hand_off` the stepping thread, after each step, waits until the loop
has passed that step's outputs on (their chunks written to the sockets; the loop signals an eventfd; at
most `HAND_OFF_TIMEOUT_S`) with its OpenMP workers asleep (`cpu_openmp`), so the loop and the model take
turns at the cores instead of fighting over them. With 32 streams on 2 cores that made a step plus its
hand-off 8.2 ms instead of 10 ms (benchmarks/RESULTS.md); waiting with the workers spinning gained nothing,
as they spun on the core the loop needed. A hand-off engine's thread, and the team it starts, also stay
SCHED_OTHER while the process's other threads move to SCHED_BATCH, so those never preempt the team mid-step
(`cpu_sched`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator

from shardserve.config import EngineConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.processor import ProcessedPrompt
from shardserve.inputs import PromptType
from shardserve.lora.request import LoRARequest
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import RequestOutputKind, SamplingParams
from shardserve.workers.cpu_openmp import park_workers_until_signalled
from shardserve.workers.cpu_sched import favour_this_thread

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed and serves no more requests; the replica must be rebuilt."""


HAND_OFF_TIMEOUT_S = 0.005   # a loop busy with other work delays a step by at most this
HAND_OFF_PASSES = 4           # loop iterations: stream -> SSE text -> response task -> socket, and a spare
WATCH_INTERVAL_S = 1.0        # how soon a request waiting on an engine that died gets the error


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, num_threads: int | None = None, hand_off: bool = False):
        self.engine: LLMEngine | None = None
        self._num_threads = num_threads
        self.hand_off = hand_off
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Mailbox]] = {}
        self._watched: set[asyncio.AbstractEventLoop] = set()   # loops with a _watch timer running
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._stopped = False
        self.num_steps = 0
        self.step_seconds = 0.0   # time inside engine.step(), for the metrics and benchmarks
        self.hand_off_seconds = 0.0   # time the stepping thread waited for the loop (hand_off)
        # The loops write here once they have passed a step's outputs on (hand_off). Closed with the engine
        # object: a loop's pending signal holds the engine, so it never writes to a closed (or reused) fd.
        self._passed_on = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if hand_off else None
        if self._passed_on is not None:
            weakref.finalize(self, os.close, self._passed_on)
        self._team_size = 1
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, started), name="shardserve-engine",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if self.engine is None:
            raise self.error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def processor(self):
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def default_sampling_params(self) -> dict:
        return self.engine.default_sampling_params

    def check_health(self, ping_workers: bool = False) -> None:
        if self.error is not None:
            raise EngineDeadError(f"The engine failed: {self.error}")
        if not self._thread.is_alive():
            raise EngineDeadError("The engine's stepping thread is not running.")
        if ping_workers:
            try:
                self.engine.executor.check_health()
            except Exception as e:
                self.error = e  # a replica with a dead worker takes no more requests
                raise EngineDeadError(f"The engine lost a worker: {e}") from e

    def generate(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams, request_id: str | None = None,
                 priority: int = 0, reasoning_ended: bool | None = None,
                 lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, the last one with `finished=True`. Bad input
        raises here; the request is queued when the iteration starts, so an iterator never started (a later
        prompt of the same call failed) leaves nothing behind. `priority`, `lora_request`: as
        `LLMEngine.add_request`; `reasoning_ended`: as `Processor.make_requests`."""
        request_id = request_id or f"req-{next(self._ids)}"
        return self._stream(request_id, self._add_command(request_id, prompt, params, False, priority,
                                                          reasoning_ended, lora_request), _is_delta(params))

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                    hold_kv: bool = False, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request now (bad input raises here) and return its outputs, as `generate`. `hold_kv`: as
        `LLMEngine.add_request`, for beams to fork from."""
        command = self._add_command(request_id, prompt, params, hold_kv, priority, lora_request=lora_request)
        return self._stream(request_id, self._queue(request_id, command, _is_delta(params)))

    def fork_request(self, request_id: str, parent_request_id: str, token_id: int,
                     params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue `LLMEngine.fork_request` now and return the fork's outputs."""
        self.check_health()
        command = ("fork", request_id, parent_request_id, token_id, params)
        return self._stream(request_id, self._queue(request_id, command, _is_delta(params)))

    def _add_command(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                     hold_kv: bool, priority: int, reasoning_ended: bool | None = None,
                     lora_request: LoRARequest | None = None) -> tuple:
        """The stepping thread's command that adds the request, made (and so checked) on the caller's thread."""
        self.check_health()
        children = self.engine.processor.make_requests(request_id, prompt, params, priority, reasoning_ended,
                                                       lora_request)
        for child in children:
            child.hold_kv = hold_kv
        return ("add", request_id, children)

    def release_requests(self, request_ids: list[str]) -> None:
        """`LLMEngine.release_requests`, in order after the commands queued before it."""
        if request_ids:
            self._commands.put(("release", list(request_ids)))

    def _queue(self, request_id: str, command: tuple, delta: bool) -> _Mailbox:
        """Queue `command` for the stepping thread, with a mailbox on this loop for the request's outputs."""
        loop = asyncio.get_running_loop()
        stream = _Mailbox(delta)
        self._streams[request_id] = (loop, stream)
        if loop not in self._watched:
            self._watched.add(loop)
            loop.call_later(WATCH_INTERVAL_S, self._watch, loop)
        self._commands.put(command)
        return stream

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On `loop`, every WATCH_INTERVAL_S while it has streams: a request never waits on an engine that has
        died (its thread gone, or a worker found dead by a health check while a step hangs on it). One timer
        per loop rather than a timeout per awaited output, which cost the loop ~5 us a streamed token."""
        waiting = [stream for stream_loop, stream in list(self._streams.values()) if stream_loop is loop]
        if not waiting:
            self._watched.discard(loop)
            return
        try:
            self.check_health()
        except EngineDeadError as e:
            for stream in waiting:
                stream.put(e)
        loop.call_later(WATCH_INTERVAL_S, self._watch, loop)

    async def _stream(self, request_id: str, queued: _Mailbox | tuple,
                      delta: bool = False) -> AsyncIterator[RequestOutput]:
        """The request's outputs from its mailbox; a command not yet queued (no mailbox) is queued at the first
        output asked for."""
        stream = queued if isinstance(queued, _Mailbox) else self._queue(request_id, queued, delta)
        finished = False
        try:
            while not finished:
                while stream.item is None:  # an engine that dies puts its error here (_watch)
                    stream.waiter = asyncio.get_running_loop().create_future()
                    await stream.waiter
                item, stream.item = stream.item, None
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # the stepping thread ----------------------------------------------------------------------------

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, children = command
            if request_id in self._streams:  # not already abandoned by its caller
                self.engine.add_processed_request(request_id, children)
        elif kind == "fork":
            _, request_id, parent_request_id, token_id, params = command
            if request_id in self._streams:
                self.engine.fork_request(request_id, parent_request_id, token_id, params)
        elif kind == "release":
            self.engine.release_requests(command[1])
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]], hand_off: bool = False) -> int:
        """Hand each item to its request's stream: one wake-up per event loop per step, not one per request
        (each wake-up costs the loop's thread the GIL and a system call). Returns the number of loops woken;
        with `hand_off` each writes to `_passed_on` once it has passed the items on."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is not None:
                loop, stream = entry
                by_loop.setdefault(loop, []).append((stream, item))
        signal = self._signal_passed_on if hand_off else None
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs, signal)
        return len(by_loop)

    def _signal_passed_on(self) -> None:  # on a loop
        os.eventfd_write(self._passed_on, 1)

    def _run(self, config: EngineConfig, started: threading.Event) -> None:
        try:
            if self.hand_off:  # before the OpenMP team exists: its threads inherit this thread's policy
                favour_this_thread()
            import torch
            if self._num_threads:
                torch.set_num_threads(self._num_threads)
            self._team_size = torch.get_num_threads()  # the OpenMP team this thread's parallel regions use
            self.engine = LLMEngine(config)
        except BaseException as e:
            self.error = e
            return
        finally:
            started.set()
        while not self._stopped:
            # Idle: block until a command arrives. Busy: take whatever arrived during the last step.
            try:
                command = self._commands.get(block=not self.engine.has_unfinished_requests())
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                try:
                    self._apply(command)
                except Exception as e:  # e.g. a duplicate request id: that request fails, not the engine
                    if command[0] in ("add", "fork"):
                        self._deliver(command[1], e)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                start = time.perf_counter()
                outputs = self.engine.step()
                self.step_seconds += time.perf_counter() - start
                self.num_steps += 1
            except BaseException as e:
                logger.exception("Engine step failed; the engine stops serving.")
                self.error = e
                dead = EngineDeadError(f"The engine failed while serving this request: {e}")
                self._deliver_all([(request_id, dead) for request_id in list(self._streams)])
                return
            # Going idle, the engine has no next step to keep from the loop: no hand-off (one-token requests
            # came back 1.8 ms sooner without it, benchmarks/RESULTS.md).
            hand_off = self.hand_off and self.engine.has_unfinished_requests()
            if hand_off:
                try:  # a signal from a loop that missed the last hand-off's time limit must not end this one
                    os.eventfd_read(self._passed_on)
                except BlockingIOError:
                    pass
            loops = self._deliver_all([(output.request_id, output) for output in outputs], hand_off)
            if hand_off and loops:
                waited = time.perf_counter()
                park_workers_until_signalled(self._passed_on, loops, HAND_OFF_TIMEOUT_S, self._team_size)
                self.hand_off_seconds += time.perf_counter() - waited


def _is_delta(params) -> bool:
    return getattr(params, "output_kind", None) == RequestOutputKind.DELTA


class _Mailbox:
    """One request's output not yet taken by its consumer (`_stream`), on the consumer's loop. A newer output
    replaces an untaken one (outputs are cumulative), or with DELTA outputs is folded into it (vLLM's output
    collector); an error is kept over anything that comes after it."""
    __slots__ = ("item", "waiter", "delta")

    def __init__(self, delta: bool = False):
        self.item: RequestOutput | BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.delta = delta

    def put(self, item: RequestOutput | BaseException) -> None:
        if self.delta and isinstance(self.item, RequestOutput) and isinstance(item, RequestOutput):
            self.item.add(item)
        elif not isinstance(self.item, BaseException):
            self.item = item
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _put_all(pairs: list[tuple[_Mailbox, object]], passed_on) -> None:
    for stream, item in pairs:
        stream.put(item)
    if passed_on is not None:
        _call_after_passes(passed_on, HAND_OFF_PASSES)


def _call_after_passes(passed_on, passes: int) -> None:
    """Call `passed_on` once the work the items woke has run: the loop runs ready callbacks in order, so
    each pass lets every task made ready by the pass before take its turn."""
    if passes == 0:
        passed_on()
    else:
        asyncio.get_running_loop().call_soon(_call_after_passes, passed_on, passes - 1)
