"""One served model: `ModelServer` owns an async engine (and, for TP x PP > 1, the engine's worker actors,
in the placement group Serve reserved for the replica) and answers routes on it. It runs as the replicas of
a `ModelDeployment` behind the router, or inside the router's own replicas when an app serves one model.

It takes JSON bodies the router checked (and checks them into its request models again: they crossed Ray), or
from a router in its own process the request models themselves; answers come back as {"status", "body"}
(errors included, so no exception has to survive Ray's transport), streams as a first {"status"} item and then
chunks.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator

from pydantic import BaseModel
from ray import serve

from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.entrypoints.chat_utils import load_chat_template
from shardserve.lora.request import LoRARequest
from shardserve.router.errors import to_api_error
from shardserve.router.errors import APIError
from shardserve.router.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest)
from shardserve.router.protocol_pooling import (ClassificationRequest, CohereEmbedRequest, EmbeddingRequest,
                                                PoolingRequest, RerankRequest, ScoreRequest)
from shardserve.router.responses import ResponsesRequest
from shardserve.router.serving import OpenAIServing
from shardserve.router.serving_pooling import PoolingServing
from shardserve.router.spec import ModelSpec

logger = logging.getLogger(__name__)

_REQUESTS = {"completion": CompletionRequest, "chat": ChatCompletionRequest, "tokenize": TokenizeRequest,
             "detokenize": DetokenizeRequest, "embeddings": EmbeddingRequest, "pooling": PoolingRequest,
             "classify": ClassificationRequest, "score": ScoreRequest, "rerank": RerankRequest,
             "cohere_embed": CohereEmbedRequest, "responses": ResponsesRequest}
_POOLING_ROUTES = {"embeddings", "pooling", "classify", "score", "rerank", "cohere_embed"}
_ADAPTER_ROUTES = {"completion", "chat", "responses"}   # the routes that run a request through a LoRA adapter
# The routes each runner serves; the others answer 400 naming the runner that serves them.
_RUNNER_ROUTES = {"generate": {"completion", "chat", "responses", "tokenize", "detokenize"},
                  "pooling": _POOLING_ROUTES | {"tokenize", "detokenize"}}


class ModelServer:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        # No torch work on this thread: the engine's own thread loads and runs the model (see async_engine).
        num_threads = int(os.environ.get("SHARDSERVE_NUM_THREADS", spec.num_threads))
        self.engine = AsyncLLMEngine(spec.engine_config(), num_threads=num_threads,
                                     hand_off=_hand_off(spec, num_threads))
        self.serving = OpenAIServing(self.engine, spec.name, load_chat_template(spec.chat_template),
                                     spec.enable_prompt_tokens_details, spec.tool_parser(),
                                     spec.reasoning_parser, spec.tool_strict(), spec.chat_template_content_format)
        self.pooling = PoolingServing(self.serving)
        self.runner = self.engine.engine.runner
        # What start-up made (the model, tokenizer, Ray, Serve, FastAPI: ~380k objects for a small model) lives
        # as long as the replica; out of the collector's reach, a full collection no longer stops every stream
        # and step for ~200 ms holding the GIL (as vLLM freezes its heap after start-up).
        gc.collect()
        gc.freeze()

    def info(self) -> dict:
        executor, config = self.engine.engine.executor, self.engine.engine.config
        return {"id": self.spec.name, "root": self.spec.model, "max_model_len": self.engine.max_model_len,
                "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
                "block_size": config.block_size, "enable_prefix_caching": config.enable_prefix_caching,
                "scheduling_policy": config.scheduling_policy,
                "runner": self.runner, "replica_pid": os.getpid(),
                "worker_pids": [i["pid"] for i in getattr(executor, "node_info", [])],
                "num_steps": self.engine.num_steps, "step_seconds": self.engine.step_seconds,
                "hand_off": self.engine.hand_off, "hand_off_seconds": self.engine.hand_off_seconds,
                "num_unfinished": self.engine.engine.get_num_unfinished_requests(),
                "gc_frozen": gc.get_freeze_count()}

    async def check_health(self) -> None:
        """Serve calls this periodically (and /health on demand): a dead engine or worker marks the replica
        unhealthy, and Serve replaces it with a fresh one. The workers are pinged from a thread: a hung one
        would otherwise hold up the event loop that serves every request for the ping's timeout."""
        await asyncio.to_thread(self.engine.check_health, ping_workers=True)

    async def check_adapter(self, lora: LoRARequest) -> dict:
        """Whether this model can run `lora` (the engine's full check, on a thread: it reads the adapter's
        files), as {"status"} with the error body when it cannot."""
        try:
            await asyncio.to_thread(self.engine.engine.processor.check_lora, lora)
            return {"status": 200}
        except Exception as e:
            error = to_api_error(e)
            return {"status": error.status, "body": error.body()}

    def _answer(self, route: str, body: dict | BaseModel, lora: LoRARequest | None):
        """What the route's method returns for the request in `body` (as the router in this process already
        checked it, or checked here) through `lora`'s adapter."""
        if lora is not None and route in _POOLING_ROUTES:
            raise APIError(f"`{lora.lora_name}` is a LoRA adapter: adapters serve completions and chat only.",
                           param="model")
        if route not in _RUNNER_ROUTES[self.runner]:
            other = "pooling" if self.runner == "generate" else "generate"
            raise APIError(f"The model `{self.spec.name}` runs the {self.runner!r} runner, which does not serve "
                           f"this route; it needs a model served with the {other!r} runner.")
        request = body if isinstance(body, BaseModel) else _REQUESTS[route].model_validate(body)
        if route in _POOLING_ROUTES:
            return getattr(self.pooling, route)(request)
        method = getattr(self.serving, route)
        return method(request, lora) if route in _ADAPTER_ROUTES else method(request)

    async def call(self, route: str, body: dict | BaseModel, lora: LoRARequest | None = None) -> dict:
        try:
            result = self._answer(route, body, lora)
            if hasattr(result, "__await__"):
                result = await result
            return {"status": 200, "body": result}
        except Exception as e:  # every failure becomes an API error body
            error = to_api_error(e)
            if error.status >= 500:
                logger.exception("Request failed")
            return {"status": error.status, "body": error.body()}

    async def open_stream(self, route: str, body: dict | BaseModel, lora: LoRARequest | None = None,
                          through_serve: bool = False) -> tuple[dict, AsyncIterator[str] | None]:
        """The response's {"status"} (with the error body when it is not 200) and its server-sent-event text.
        Closing the events closes the chain down to the engine's stream, which aborts the request.
        `through_serve`: the consumer is another replica, so the events that pile up while it is busy go out
        together (under load each hop through Serve then carries many tokens, not one). The router in this
        replica's own process takes each event as it comes, unless the spec sets a stream interval."""
        try:
            chunks = await self._answer(route, body, lora)
        except Exception as e:
            error = to_api_error(e)
            return {"status": error.status, "body": error.body()}, None
        events = _sse_events(chunks, framed=route == "responses")
        if through_serve or self.spec.stream_interval_s > 0:
            events = _coalesce(events, self.spec.stream_interval_s)
        return {"status": 200}, events

    async def stream(self, route: str, body: dict | BaseModel, lora: LoRARequest | None = None):
        """`open_stream` for a router in another process, through a Serve handle: the {"status"} item, then
        the events."""
        head, events = await self.open_stream(route, body, lora, through_serve=True)
        yield head
        if events is None:
            return
        async with contextlib.aclosing(events):  # the consumer went away: the request is aborted
            async for text in events:
                yield text


async def _sse_events(chunks: AsyncIterator[str], framed: bool = False) -> AsyncIterator[str]:
    """Server-sent events of a stream's chunks (JSON text), ended by [DONE]; `framed`: the chunks are whole
    events already (`event: TYPE`, `data: JSON`: the Responses API's, which has no [DONE])."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk if framed else f"data: {chunk}\n\n"
        except Exception as e:  # mid-stream failure: an error event, then the stream ends
            body = json.dumps(to_api_error(e).body())
            yield f"event: error\ndata: {body}\n\n" if framed else f"data: {body}\n\n"
    if not framed:
        yield "data: [DONE]\n\n"


async def _coalesce(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """Join the events that are ready by the time the previous batch has been taken, and send at most one
    batch per `interval_s` (a stream interval in time, where vLLM's --stream-interval counts tokens): each batch
    costs two hops through Serve."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for event in events:
                queue.put_nowait(event)
        finally:
            queue.put_nowait(end)
    task = asyncio.create_task(pump())
    try:
        last = 0.0
        while True:
            wait = last + interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = batch[-1] is end
            text = "".join(e for e in batch if e is not end)
            if text:
                yield text
                last = time.monotonic()
            if done:
                return
    finally:
        task.cancel()


def _hand_off(spec: ModelSpec, num_threads: int) -> bool:
    """Whether the engine hands the cores to the loop after each step (AsyncLLMEngine): when it runs the
    model itself, on the CPU, with threads on every core the replica may use, so the loop has none of its
    own. SHARDSERVE_HAND_OFF=1 / 0 forces it on / off."""
    forced = os.environ.get("SHARDSERVE_HAND_OFF")
    if forced is not None:
        return forced == "1"
    return (spec.world_size == 1 and spec.resolved_device() == "cpu"
            and num_threads >= len(os.sched_getaffinity(0)))


ModelDeployment = serve.deployment(ModelServer, name="ModelDeployment")
