"""One served model: a Serve deployment whose replicas each own an async engine (and, for TP x PP > 1,
the engine's worker actors, in the placement group Serve reserved for the replica).

The ingress sends validated JSON bodies; answers come back as {"status", "body"} (errors included, so no
exception has to survive Ray's transport), streams as a first {"status"} item and then chunks.
"""
from __future__ import annotations

import logging
import os

from ray import serve

from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.entrypoints.chat_utils import load_chat_template
from shardserve.router.errors import to_api_error
from shardserve.router.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest)
from shardserve.router.serving import OpenAIServing
from shardserve.router.spec import ModelSpec

logger = logging.getLogger(__name__)

_REQUESTS = {"completion": CompletionRequest, "chat": ChatCompletionRequest, "tokenize": TokenizeRequest,
             "detokenize": DetokenizeRequest}


@serve.deployment
class ModelDeployment:
    def __init__(self, spec: ModelSpec):
        import torch
        # Ray gives a replica OMP_NUM_THREADS=<its CPU share>; the engine's matmuls want the node's cores.
        torch.set_num_threads(int(os.environ.get("SHARDSERVE_NUM_THREADS", os.cpu_count() or 1)))
        self.spec = spec
        self.engine = AsyncLLMEngine(spec.engine_config())
        self.serving = OpenAIServing(self.engine, spec.name, load_chat_template(spec.chat_template))

    def info(self) -> dict:
        executor = self.engine.engine.executor
        return {"id": self.spec.name, "root": self.spec.model, "max_model_len": self.engine.max_model_len,
                "runner": "generate", "replica_pid": os.getpid(),
                "worker_pids": [i["pid"] for i in getattr(executor, "node_info", [])]}

    def check_health(self) -> None:
        """Serve calls this periodically (and /health on demand): a dead engine or worker marks the replica
        unhealthy, and Serve replaces it with a fresh one."""
        self.engine.check_health(ping_workers=True)

    async def call(self, route: str, body: dict) -> dict:
        try:
            request = _REQUESTS[route].model_validate(body)
            method = getattr(self.serving, route)
            result = method(request)
            if hasattr(result, "__await__"):
                result = await result
            return {"status": 200, "body": result}
        except Exception as e:  # every failure becomes an API error body
            error = to_api_error(e)
            if error.status >= 500:
                logger.exception("Request failed")
            return {"status": error.status, "body": error.body()}

    async def stream(self, route: str, body: dict):
        try:
            request = _REQUESTS[route].model_validate(body)
            chunks = await getattr(self.serving, route)(request)
        except Exception as e:
            error = to_api_error(e)
            yield {"status": error.status, "body": error.body()}
            return
        yield {"status": 200}
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:  # mid-stream failure: an error event, then the stream ends
            yield {"error": to_api_error(e).body()}
