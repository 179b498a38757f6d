"""The HTTP front: a FastAPI app behind HAProxy (or Serve's proxy) that checks requests and routes them by
`model`.

It parses and schema-checks bodies (so malformed input is answered here, in OpenAI's error shape, with
400 rather than FastAPI's 422), checks the API key, picks the model's deployment and relays its answer,
or its chunks as server-sent events. It knows nothing of tensors or tokens.

An app that serves one model needs no routing: its router replicas then hold the model themselves (a
`ModelServer` each, with the model's resources and autoscaling), which saves a hop through Serve per request
and per streamed chunk.
"""

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

import shardserve
from shardserve.lora.request import LoRARequest
from shardserve.router.adapters import INVALID, AppAdapters
from shardserve.router.errors import APIError
from shardserve.router.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        LoadLoRAAdapterRequest, TokenizeRequest, UnloadLoRAAdapterRequest)
from shardserve.router.protocol_pooling import (ClassificationRequest, CohereEmbedRequest, EmbeddingRequest,
                                                PoolingRequest, RerankRequest, ScoreRequest)
from shardserve.router.responses import ResponsesRequest, not_stored

logger = logging.getLogger(__name__)

app = FastAPI(title="shardserve")


@dataclasses.dataclass
class CORSOptions:
    """Which web pages may call the API from a browser (vLLM's --allowed-origins, --allowed-credentials,
    --allowed-methods, --allowed-headers, with its defaults: any origin, method and header)."""
    allowed_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_credentials: bool = False
    allowed_methods: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = dataclasses.field(default_factory=lambda: ["*"])


class _ReplicaCORS:
    """Starlette's CORSMiddleware with the options of the Router in this process. Serve serves a copy of `app`
    pickled when this module is imported, before any options are known; the middleware stack is built at the
    first request, after the Router (one per replica process) has set `options`."""
    options = CORSOptions()

    def __init__(self, app):
        o = self.options
        self.cors = CORSMiddleware(app, allow_origins=o.allowed_origins, allow_credentials=o.allowed_credentials,
                                   allow_methods=o.allowed_methods, allow_headers=o.allowed_headers)

    async def __call__(self, scope, receive, send) -> None:
        await self.cors(scope, receive, send)


app.add_middleware(_ReplicaCORS)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "Invalid request: " + "; ".join(parts)


async def _parse(request: Request, schema: type[BaseModel]) -> tuple[BaseModel, dict]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        return schema.model_validate(body), body
    except ValidationError as e:   # (vLLM's param: where the first error is, as "body.messages")
        where = ".".join(str(x) for x in ("body", *e.errors()[0].get("loc", ())))
        raise APIError(_validation_message(e), param=where) from None


class _EventStream(StreamingResponse):
    """Server-sent events from the model in this replica, closed once the response ends, whether they ran to
    the end or the client went away (closing them aborts the request)."""

    media_type = "text/event-stream"
    body_iterator: AsyncGenerator[str, None]

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Router:
    def __init__(self, models: dict[str, DeploymentHandle], api_key: str | None = None, local=None,
                 cors: CORSOptions | None = None, adapters: dict[str, tuple[str, LoRARequest]] | None = None,
                 runtime_adapters_scope: str | None = None, lora_resolver_dir: str | None = None):
        """`models`: each served name's deployment; or `local`, the ModelSpec of the app's one model, which
        this replica then serves itself. `adapters`: each start-up LoRA adapter's name -> (its model's name, its
        request); a request naming one goes to its model's deployment, with the adapter. `runtime_adapters_scope`:
        where adapters loaded at run time are kept (router/adapters.py); None: runtime updating is off.
        `lora_resolver_dir`: where a request's unknown model name may be found as an adapter (vLLM's resolver)."""
        _ReplicaCORS.options = cors or CORSOptions()
        if local is not None:  # imported here: a router in front of model deployments needs no engine
            from shardserve.router.model_deployment import ModelServer
            self.local = ModelServer(local)
        else:
            self.local = None
        self.models = {local.name: None} if local is not None else models
        self.adapters = AppAdapters(adapters or {}, runtime_adapters_scope, lora_resolver_dir)
        self._resolving: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.api_key = api_key
        self._info: dict[str, dict] = {}
        self.created = int(time.time())

    # what Serve asks of a replica holding the model itself ------------------------------------------

    async def check_health(self) -> None:
        if self.local is not None:
            await self.local.check_health()

    def info(self) -> dict:
        return self.local.info()

    # helpers ----------------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None or not request.url.path.startswith(("/v1", "/v2")):
            return  # as in vLLM: the versioned APIs need the key; health, version, tokenize do not
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError("Unauthorized: a valid API key is required (Authorization: Bearer <key>).", 401)

    async def _target(self, name: str | None) -> tuple[DeploymentHandle | None, LoRARequest | None]:
        """The deployment serving the model `name` (None: the app's first), and the adapter a request naming
        one runs through."""
        if name is None:
            name = next(iter(self.models))
        if name in self.models:
            return self.models[name], None
        adapter = await self.adapters.resolve(name) or await self._resolve(name)
        if adapter is None:
            raise APIError(f"The model `{name}` does not exist. Valid aliases: "
                           f"{', '.join([*self.models, *self.adapters.static])}.", 404, param="model")
        base, lora = adapter
        return self.models[base], lora

    async def _resolve(self, name: str) -> tuple[str, LoRARequest] | None:
        """The adapter the resolver's folder holds under `name`, loaded now for the served model it was made for
        (vLLM's filesystem resolver), or None. One load per name at a time in this replica; another replica's
        load of it first is taken as it is."""
        found = self.adapters.found(name)
        if found is None:
            return None
        async with self._resolving[name]:
            loaded = await self.adapters.resolve(name)  # by a request that held the lock before this one
            if loaded is not None:
                return loaded
            folder, base_model = found
            bases = [m for m in self.models if (await self._model_info(m))["root"] == base_model]
            if not bases:
                return None
            try:
                return bases[0], await self._load(name, folder, bases[0], load_inplace=False)
            except APIError:
                loaded = await self.adapters.resolve(name)
                if loaded is None:  # not loadable: said in the engine's words (as vLLM, a 400)
                    raise
                return loaded

    async def _load(self, name: str, path: str, base: str, load_inplace: bool) -> LoRARequest:
        """Serve the adapter at `path` under `name` for the model `base`, once the model has checked it (`add`
        refuses a name another replica loaded meanwhile)."""
        lora = await self.adapters.new_request(name, path)
        if self.local is not None:
            answer = await self.local.check_adapter(lora)
        else:
            answer = await self.models[base].check_adapter.remote(lora)
        if answer["status"] != 200:  # not an adapter this model can run, in the engine's words
            raise APIError(answer["body"]["error"]["message"], answer["status"], param="lora_path")
        await self.adapters.add(base, lora, load_inplace)
        logger.info("Loaded LoRA adapter %r for %r from %s (id %d)", name, base, path, lora.lora_int_id)
        return lora

    async def _relay(self, request: Request, route: str, schema: type[BaseModel]):
        try:
            self._check_key(request)
            parsed, body = await _parse(request, schema)
            handle, lora = await self._target(getattr(parsed, "model", None))
        except APIError as e:
            return _error(e)
        if getattr(parsed, "stream", False):
            return await self._relay_stream(handle, route, parsed if self.local is not None else body, lora)
        if self.local is not None:  # the model in this process takes the checked request as it is
            answer = await self.local.call(route, parsed, lora)
        else:
            answer = await handle.call.remote(route, body, lora)
        return JSONResponse(answer["body"], status_code=answer["status"])

    async def _relay_stream(self, handle: DeploymentHandle | None, route: str, body: dict | BaseModel,
                            lora: LoRARequest | None):
        if self.local is not None:  # the model's own event stream, each chunk straight to the response
            head, events = await self.local.open_stream(route, body, lora)
            if head["status"] != 200:
                return JSONResponse(head["body"], status_code=head["status"])
            return _EventStream(events)
        chunks = handle.options(stream=True).stream.remote(route, body, lora)
        head = await chunks.__anext__()
        if head["status"] != 200:
            chunks.cancel()
            return JSONResponse(head["body"], status_code=head["status"])

        async def events():
            try:
                async for text in chunks:  # server-sent-event text, made by the model's server
                    yield text
            except asyncio.CancelledError:  # the client went away: stop the model's stream too
                chunks.cancel()
                raise
        return StreamingResponse(events(), media_type="text/event-stream")

    async def _model_info(self, name: str) -> dict:
        if name not in self._info:
            local = self.local
            self._info[name] = local.info() if local is not None else await self.models[name].info.remote()
        return self._info[name]

    # routes -----------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._relay(request, "completion", CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._relay(request, "chat", ChatCompletionRequest)

    @app.post("/v1/responses")
    async def responses(self, request: Request):
        return await self._relay(request, "responses", ResponsesRequest)

    @app.get("/v1/responses/{response_id}")
    @app.post("/v1/responses/{response_id}/cancel")
    async def stored_response(self, request: Request, response_id: str):
        """Retrieving or cancelling a response: none is stored (as vLLM without its response store)."""
        try:
            self._check_key(request)
            raise not_stored(response_id)
        except APIError as e:
            return _error(e)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._relay(request, "embeddings", EmbeddingRequest)

    @app.post("/v2/embed")
    async def cohere_embed(self, request: Request):
        return await self._relay(request, "cohere_embed", CohereEmbedRequest)

    @app.post("/pooling")
    async def pooling(self, request: Request):
        return await self._relay(request, "pooling", PoolingRequest)

    @app.post("/classify")
    async def classify(self, request: Request):
        return await self._relay(request, "classify", ClassificationRequest)

    @app.post("/score")
    @app.post("/v1/score")
    async def score(self, request: Request):
        return await self._relay(request, "score", ScoreRequest)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(self, request: Request):
        return await self._relay(request, "rerank", RerankRequest)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._relay(request, "tokenize", TokenizeRequest)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._relay(request, "detokenize", DetokenizeRequest)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            self._check_key(request)
        except APIError as e:
            return _error(e)
        data = []
        served = [(name, None, None) for name in self.models] + [
            (name, base, lora.lora_path) for name, (base, lora) in (await self.adapters.all()).items()]
        for name, base, path in served:
            info = await self._model_info(base or name)
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "shardserve",
                         "root": path or info["root"], "parent": base, "max_model_len": info["max_model_len"],
                         "permission": [{"id": f"modelperm-{name}", "object": "model_permission",
                                         "created": self.created, "allow_create_engine": False,
                                         "allow_sampling": True, "allow_logprobs": True,
                                         "allow_search_indices": False, "allow_view": True,
                                         "allow_fine_tuning": False, "organization": "*", "group": None,
                                         "is_blocking": False}]})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        """vLLM's: serve the adapter at `lora_path` under `lora_name` from now on, on every replica (once one
        replica of its model has checked it)."""
        try:
            self._check_key(request)
            self.adapters.check_runtime_updating()
            parsed, _ = await _parse(request, LoadLoRAAdapterRequest)
            name, path = parsed.lora_name, parsed.lora_path
            if not name or not path:
                raise APIError("Both 'lora_name' and 'lora_path' must be provided.", type=INVALID)
            if name in self.models:
                raise APIError(f"The lora adapter '{name}' conflicts with a served base model.", type=INVALID)
            await self.adapters.check_loadable(name, parsed.load_inplace)
            await self._load(name, path, self._adapter_base(parsed.base_model_name), parsed.load_inplace)
        except APIError as e:
            return _error(e)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        try:
            self._check_key(request)
            self.adapters.check_runtime_updating()
            parsed, _ = await _parse(request, UnloadLoRAAdapterRequest)
            if not parsed.lora_name:
                raise APIError("'lora_name' needs to be provided to unload a LoRA adapter.", type=INVALID)
            await self.adapters.remove(parsed.lora_name)
        except APIError as e:
            return _error(e)
        logger.info("Unloaded LoRA adapter %r", parsed.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{parsed.lora_name}' removed successfully.")

    def _adapter_base(self, name: str | None) -> str:
        """The model a run-time adapter is for: the one named, or the app's only model."""
        if name is not None:
            if name not in self.models:
                raise APIError(f"The model `{name}` does not exist. Served models: {', '.join(self.models)}.",
                               404, param="base_model_name")
            return name
        if len(self.models) > 1:
            raise APIError(f"This app serves several models ({', '.join(self.models)}): name the adapter's model "
                           f"in base_model_name.", param="base_model_name")
        return next(iter(self.models))

    @app.get("/health")
    async def health(self):
        try:
            if self.local is not None:
                await self.local.check_health()
            else:
                await asyncio.gather(*(h.check_health.remote() for h in self.models.values()))
        except Exception as e:  # a replica whose engine died
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version(self):
        return {"version": shardserve.__version__}
