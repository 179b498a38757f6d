"""The Serve application: one deployment per served model behind one ingress; an app of one model is
the ingress alone, its replicas holding the model (one Serve hop fewer per request and streamed chunk).

`build_app` takes `ModelSpec`s (the CLI); `app_builder` takes a Serve config's `args`
(`import_path: shardserve.router.app:app_builder`, `args: {models: [{model: ..., ...}], api_key: ...}`, and
vLLM's CORS settings as `allowed_origins`, `allowed_credentials`, `allowed_methods`, `allowed_headers`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ray.serve import Application

from shardserve.router.ingress import CORSOptions, Router
from shardserve.router.model_deployment import ModelDeployment
from shardserve.router.spec import ModelSpec


def build_app(specs: list[ModelSpec], api_key: str | None = None, cors: CORSOptions | None = None) -> Application:
    if not specs:
        raise ValueError("An app serves at least one model.")
    adapters = {name: (spec.name, path) for spec in specs for name, path in spec.lora_modules.items()}
    names = [s.name for s in specs] + list(adapters)
    if len(set(names)) != len(names):
        raise ValueError(f"Served model names (LoRA adapters' too) must be unique, got {names}.")
    if len(specs) == 1:
        return Router.options(**specs[0].deployment_options(0)).bind({}, api_key, specs[0], cors, adapters)
    models = {spec.name: ModelDeployment.options(**spec.deployment_options(i)).bind(spec)
              for i, spec in enumerate(specs)}
    return Router.bind(models, api_key, None, cors, adapters)


def app_builder(args: dict[str, Any]) -> Application:
    specs = [ModelSpec(**m) if isinstance(m, dict) else ModelSpec(model=m) for m in args.get("models", [])]
    cors = CORSOptions(**{f.name: args[f.name] for f in dataclasses.fields(CORSOptions) if f.name in args})
    return build_app(specs, args.get("api_key"), cors)
