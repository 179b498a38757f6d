"""The pooling routes of one model (`/v1/embeddings`), next to its async engine like `serving.py`."""
from __future__ import annotations

import asyncio
import base64
import time
import uuid

import numpy as np

from shardserve.inputs import TokensPrompt
from shardserve.pooling_params import PoolingParams
from shardserve.router.errors import APIError
from shardserve.router.protocol import EmbeddingRequest
from shardserve.router.serving import OpenAIServing


class PoolingServing:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving          # the same model's generation front: chat rendering, engine, name
        self.engine = serving.engine

    def _prompts(self, req: EmbeddingRequest) -> list:
        if req.messages is not None:
            return [self.serving._chat_prompt(req)]
        x = req.input
        if x is None or x == "" or x == []:
            raise APIError("input must be a non-empty string, list of strings, or token ids.", param="input")
        if isinstance(x, str):
            return [x]
        if all(isinstance(t, int) for t in x):
            return [TokensPrompt(prompt_token_ids=list(x))]
        return [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in x]

    async def _pool(self, prompts: list, params: PoolingParams) -> list:
        processor = self.engine.processor
        params = processor.verify_pooling_params(params)
        processed = processor.process_pooling_prompts(prompts, [params] * len(prompts))  # all checked first
        request_id = uuid.uuid4().hex

        async def one(i: int, prompt):
            final = None
            async for final in self.engine.generate(prompt, params, f"pool-{request_id}-{i}"):
                pass
            return final
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(processed)))

    async def embeddings(self, req: EmbeddingRequest) -> dict:
        if req.encoding_format not in ("float", "base64"):
            raise APIError(f"encoding_format must be 'float' or 'base64', got {req.encoding_format!r}.",
                           param="encoding_format")
        params = PoolingParams(task="embed", dimensions=req.dimensions,
                               truncate_prompt_tokens=req.truncate_prompt_tokens, use_activation=req.use_activation)
        outputs = await self._pool(self._prompts(req), params)
        data = []
        for i, out in enumerate(outputs):
            vector = out.outputs.data.float().reshape(-1)
            embedding = (base64.b64encode(vector.numpy().astype(np.float32).tobytes()).decode()
                         if req.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.serving.model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
