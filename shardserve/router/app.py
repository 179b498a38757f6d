"""The Serve application: one deployment per served model behind one ingress; an app of one model is
the ingress alone, its replicas holding the model (one Serve hop fewer per request and streamed chunk).

`build_app` takes `ModelSpec`s (the CLI); `app_builder` takes a Serve config's `args`
(`import_path: shardserve.router.app:app_builder`, `args: {models: [{model: ..., ...}], api_key: ...}`,
vLLM's CORS settings as `allowed_origins`, `allowed_credentials`, `allowed_methods`, `allowed_headers`, and
`allow_runtime_lora_updating` and `lora_resolver_cache_dir`, vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING and
VLLM_LORA_RESOLVER_CACHE_DIR, which are read where they are not given).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Any

from ray.serve import Application

from shardserve.router.adapters import check_resolver_dir, runtime_updating_from_env
from shardserve.router.ingress import CORSOptions, Router
from shardserve.router.model_deployment import ModelDeployment
from shardserve.router.spec import ModelSpec

logger = logging.getLogger(__name__)


def build_app(specs: list[ModelSpec], api_key: str | None = None, cors: CORSOptions | None = None,
              allow_runtime_lora_updating: bool | None = None, lora_resolver_cache_dir: str | None = None
              ) -> Application:
    """`allow_runtime_lora_updating`: /v1/load_lora_adapter and /v1/unload_lora_adapter answer (None: as
    VLLM_ALLOW_RUNTIME_LORA_UPDATING says); with it, `lora_resolver_cache_dir` (None: VLLM_LORA_RESOLVER_CACHE_DIR)
    is where a request's unknown model name is looked for as an adapter."""
    if not specs:
        raise ValueError("An app serves at least one model.")
    adapters = {name: (spec.name, lora) for spec in specs for name, lora in spec.lora_requests().items()}
    names = [s.name for s in specs] + list(adapters)
    if len(set(names)) != len(names):
        raise ValueError(f"Served model names (LoRA adapters' too) must be unique, got {names}.")
    if allow_runtime_lora_updating is None:
        allow_runtime_lora_updating = runtime_updating_from_env()
    resolver_dir = check_resolver_dir(lora_resolver_cache_dir or os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR"))
    scope = None
    if resolver_dir is not None and not allow_runtime_lora_updating:
        logger.warning("The LoRA resolver's folder %s is not read: it needs runtime LoRA updating "
                       "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).", resolver_dir)
    if allow_runtime_lora_updating:  # as vLLM warns: a client may then make the server read any folder it names
        logger.warning("LoRA adapters can be loaded and unloaded at run time: only for clients you trust.")
        scope = uuid.uuid4().hex  # this build's: a redeployed app starts without the adapters loaded before
    if len(specs) == 1:
        return Router.options(**specs[0].deployment_options(0)).bind({}, api_key, specs[0], cors, adapters, scope,
                                                                     resolver_dir)
    models = {spec.name: ModelDeployment.options(**spec.deployment_options(i)).bind(spec)
              for i, spec in enumerate(specs)}
    return Router.bind(models, api_key, None, cors, adapters, scope, resolver_dir)


def app_builder(args: dict[str, Any]) -> Application:
    specs = [ModelSpec(**m) if isinstance(m, dict) else ModelSpec(model=m) for m in args.get("models", [])]
    cors = CORSOptions(**{f.name: args[f.name] for f in dataclasses.fields(CORSOptions) if f.name in args})
    return build_app(specs, args.get("api_key"), cors, args.get("allow_runtime_lora_updating"),
                     args.get("lora_resolver_cache_dir"))
