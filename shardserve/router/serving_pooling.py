"""The pooling routes of one model, next to its async engine like `serving.py`: OpenAI's `/v1/embeddings`,
vLLM's `/pooling`, `/classify`, `/score` and `/rerank`, and Cohere's `/v2/embed`."""
from __future__ import annotations

import asyncio
import base64
import time
import uuid

import numpy as np
import torch

from shardserve.engine.processor import ProcessedPrompt
from shardserve.entrypoints.score_utils import plan_scores, score_inputs, score_task
from shardserve.inputs import TokensPrompt
from shardserve.outputs import PoolingRequestOutput
from shardserve.pooling_params import PoolingParams
from shardserve.router.errors import APIError
from shardserve.router.protocol_pooling import (ClassificationRequest, CohereEmbedRequest, EmbeddingRequest,
                                                InputRequest, PoolingRequest, RerankRequest, ScoreRequest)
from shardserve.router.serving import OpenAIServing


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list | str:
    """A pooled output as JSON: nested floats, or base64 of its little-endian float32 bytes (OpenAI's
    base64 embeddings)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.float().tolist()


def cohere_embeddings(vectors: torch.Tensor, embedding_types: list[str]) -> dict[str, list]:
    """[n, d] float embeddings in each of Cohere's embedding types. binary/ubinary: one bit per feature
    (1 where it is >= 0), packed most significant bit first, 8 per byte, as int8 (byte - 128) or uint8.
    int8/uint8: each vector scaled so its largest magnitude is 127 and rounded (uint8: that + 128), which
    keeps signs and cosine similarities."""
    floats = vectors.float().numpy()
    out: dict[str, list] = {}
    for kind in dict.fromkeys(embedding_types):  # each once, in the order asked
        if kind == "float":
            out[kind] = floats.tolist()
        elif kind == "base64":
            out[kind] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in floats]
        elif kind in ("binary", "ubinary"):
            if floats.shape[1] % 8:
                raise APIError(f"Binary embedding types need a dimension divisible by 8; this one is "
                               f"{floats.shape[1]}.", param="embedding_types")
            packed = np.packbits(floats >= 0, axis=-1).astype(np.int16)
            out[kind] = (packed - 128 if kind == "binary" else packed).tolist()
        else:  # int8, uint8
            scale = np.abs(floats).max(axis=1, keepdims=True)
            quantized = np.rint(floats / np.where(scale > 0, scale, 1) * 127).astype(np.int16)
            out[kind] = (quantized if kind == "int8" else quantized + 128).tolist()
    return out


class PoolingServing:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving          # the same model's generation front: chat rendering, engine, name
        self.engine = serving.engine
        self.processor = serving.engine.processor

    # running requests ---------------------------------------------------------------------------------

    def _prompts(self, req: InputRequest) -> list:
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

    async def _pool(self, prompts: list, params: PoolingParams, prompt_name: str | None = None,
                    priority: int = 0) -> list[PoolingRequestOutput]:
        params = self.processor.verify_pooling_params(params)
        # every prompt tokenized and checked before any is queued
        processed = self.processor.process_pooling_prompts(prompts, [params] * len(prompts), prompt_name)
        return await self._run(processed, params, priority)

    async def _run(self, processed: list[ProcessedPrompt], params: PoolingParams,
                   priority: int) -> list[PoolingRequestOutput]:
        request_id = uuid.uuid4().hex
        self.processor.check_priority(priority)  # before any prompt is queued

        async def one(i: int, prompt: ProcessedPrompt):
            final = None
            async for final in self.engine.generate(prompt, params, f"pool-{request_id}-{i}", priority):
                pass
            return final
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(processed)))

    def _listing(self, prefix: str, data: list[dict], outputs: list[PoolingRequestOutput] | int) -> dict:
        """The list response: `data`, and as usage the prompt tokens of `outputs` (or that many tokens)."""
        tokens = outputs if isinstance(outputs, int) else sum(len(o.prompt_token_ids) for o in outputs)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.serving.model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # routes -------------------------------------------------------------------------------------------

    async def embeddings(self, req: EmbeddingRequest) -> dict:
        outputs = await self._pool(self._prompts(req), req.to_pooling_params("embed", dimensions=req.dimensions),
                                   priority=req.priority)
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_vector(o.outputs.data.reshape(-1), req.encoding_format)}
                for i, o in enumerate(outputs)]
        return self._listing("embd", data, outputs)

    async def pooling(self, req: PoolingRequest) -> dict:
        """The raw pooler output of the task (one vector, or one per token for token_* tasks)."""
        outputs = await self._pool(self._prompts(req), req.to_pooling_params(req.task, dimensions=req.dimensions),
                                   priority=req.priority)
        data = [{"object": "pooling", "index": i, "data": encode_vector(o.outputs.data, req.encoding_format)}
                for i, o in enumerate(outputs)]
        return self._listing("pool", data, outputs)

    async def classify(self, req: ClassificationRequest) -> dict:
        outputs = await self._pool(self._prompts(req), req.to_pooling_params("classify"), priority=req.priority)
        labels = getattr(self.processor.hf_config, "id2label", None) or {}
        data = []
        for i, o in enumerate(outputs):
            probs = o.outputs.data.float().reshape(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels.get(best, labels.get(str(best))), "probs": probs,
                         "num_classes": len(probs)})
        return self._listing("classify", data, outputs)

    async def _scores(self, req, data_1, data_2) -> tuple[list[float], int]:
        """Scores of the pairs (`score_utils`: cross-encoder or cosine of embeddings) and the tokens read."""
        data_1, data_2 = score_inputs(data_1, data_2)
        params = self.processor.verify_pooling_params(req.to_pooling_params(score_task(self.processor)))
        plan = plan_scores(self.processor, data_1, data_2, params)
        outputs = await self._run(plan.prompts, params, req.priority)
        return [r.outputs.score for r in plan.results(outputs)], sum(len(o.prompt_token_ids) for o in outputs)

    async def score(self, req: ScoreRequest) -> dict:
        scores, tokens = await self._scores(req, req.text_1, req.text_2)
        return self._listing("score", [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                             tokens)

    async def rerank(self, req: RerankRequest) -> dict:
        """The documents by relevance to the query, best first; `top_n` of them (0: all)."""
        if not req.documents:
            raise APIError("documents must hold at least one document.", param="documents")
        scores, tokens = await self._scores(req, req.query, req.documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": req.documents[i]}} if req.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": self.serving.model_name, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def cohere_embed(self, req: CohereEmbedRequest) -> dict:
        """Cohere's Embed v2: texts (or text content parts), the model's prompt for `input_type`, truncation
        END (keep the first tokens) / START (keep the last) / NONE (refuse), several embedding types."""
        texts = self._cohere_texts(req)
        if req.truncate == "NONE":
            truncation = {}
        else:
            # Cohere's max_tokens past the model's length means the model's length
            cut = min(req.max_tokens, self.engine.max_model_len) if req.max_tokens else -1
            truncation = {"truncate_prompt_tokens": cut,
                          "truncation_side": "left" if req.truncate == "START" else "right"}
        params = PoolingParams(task="embed", dimensions=req.output_dimension, **truncation)
        prompts = self.processor.model_prompts()
        if req.input_type is not None and req.input_type not in prompts:
            known = (f"its input types are {', '.join(map(repr, prompts))}" if prompts else
                     "it defines no prompts (config_sentence_transformers.json or task_instructions)")
            raise APIError(f"input_type {req.input_type!r} is not supported by the model "
                           f"`{self.serving.model_name}`: {known}.", param="input_type")
        outputs = await self._pool(texts, params, req.input_type)  # Cohere's API has no priority
        if req.truncate == "NONE" and req.max_tokens is not None:
            longest = max(len(o.prompt_token_ids) for o in outputs)
            if longest > req.max_tokens:
                raise APIError(f"An input has {longest} tokens, more than max_tokens={req.max_tokens}, and "
                               f"truncate is NONE; set truncate to END or START to cut it.", param="max_tokens")
        vectors = torch.stack([o.outputs.data.reshape(-1).float() for o in outputs])
        return {"id": f"embd-{uuid.uuid4().hex}", "response_type": "embeddings_by_type",
                "embeddings": cohere_embeddings(vectors, req.embedding_types or ["float"]), "texts": texts,
                "meta": {"api_version": {"version": "2"},
                         "billed_units": {"input_tokens": sum(len(o.prompt_token_ids) for o in outputs)}}}

    def _cohere_texts(self, req: CohereEmbedRequest) -> list[str]:
        given = [x for x in (req.texts, req.images, req.inputs) if x is not None]
        if len(given) != 1 or not given[0]:
            raise APIError("Give exactly one of texts, images or inputs, and at least one item in it.")
        if req.images is not None:
            raise APIError(f"The model `{self.serving.model_name}` embeds text only; images are not supported.",
                           param="images")
        if req.texts is not None:
            return list(req.texts)
        texts = []
        for item in req.inputs:
            parts = item.get("content") if isinstance(item, dict) else None
            if not isinstance(parts, list) or not parts:
                raise APIError("Each of inputs needs a non-empty content list.", param="inputs")
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in parts):
                raise APIError(f"The model `{self.serving.model_name}` embeds text only: every content part "
                               f"must be {{'type': 'text', 'text': ...}}.", param="inputs")
            texts.append(" ".join(p["text"] for p in parts))
        return texts
