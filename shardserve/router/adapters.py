"""The LoRA adapters an app serves, by name: those given at start-up (--lora-modules) and, with runtime updating
on (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING), those loaded and unloaded while it runs (/v1/load_lora_adapter,
/v1/unload_lora_adapter), or found when a request names them: vLLM's filesystem resolver, a folder
(VLLM_LORA_RESOLVER_CACHE_DIR) whose subfolder of the name holds an adapter of a served model.

Run-time adapters live in Ray's cluster key-value store (the GCS) under a key of the app's build, not in one
replica: every router replica of the app sees the same set at once, a replica Serve replaces finds it again, and
a redeployed app starts with none (as a restarted vLLM server). A model's replicas load an adapter's weights when
a request first names it (lora/adapter.py's cache), so loading one needs only one replica to check it.
"""
from __future__ import annotations

import asyncio
import json
import os

from shardserve.lora.request import LoRARequest
from shardserve.router.errors import APIError

_NAMESPACE = "shardserve"
INVALID = "InvalidUserInput"   # vLLM's error type for a load or unload it refuses
# Run-time adapters' ids start above any start-up adapter's and are never reused: an engine that saw an id keeps
# its weights (and its prefix-cache blocks) under it, so an adapter reloaded in place gets a new one.
_FIRST_RUNTIME_ID = 1 << 20


def runtime_updating_from_env() -> bool:
    """vLLM's switch, read as vLLM reads it."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


def check_resolver_dir(folder: str | None) -> str | None:
    if folder is not None and not os.path.isdir(folder):
        raise ValueError(f"The LoRA resolver's cache folder (VLLM_LORA_RESOLVER_CACHE_DIR) {folder!r} is not a "
                         f"folder.")
    return folder


class AppAdapters:
    """Adapter name -> (its base model's name, its LoRARequest). `scope`: the key of the app's build under which
    run-time adapters are kept; None where runtime updating is off."""

    def __init__(self, static: dict[str, tuple[str, LoRARequest]], scope: str | None = None,
                 resolver_dir: str | None = None):
        self.static = static
        self.scope = scope
        self.resolver_dir = resolver_dir if scope is not None else None  # as vLLM: only with runtime updating
        self._next_id: int | None = None   # where this replica next tries to claim an id

    async def resolve(self, name: str) -> tuple[str, LoRARequest] | None:
        if name in self.static:
            return self.static[name]
        if self.scope is None:
            return None
        record = await asyncio.to_thread(_kv("get"), self._key("name", name), namespace=_NAMESPACE)
        return None if record is None else _from_record(name, record)

    async def all(self) -> dict[str, tuple[str, LoRARequest]]:
        adapters = dict(self.static)
        if self.scope is not None:
            adapters.update(await asyncio.to_thread(self._runtime_adapters))
        return adapters

    def _runtime_adapters(self) -> dict[str, tuple[str, LoRARequest]]:
        prefix = self._key("name", "")
        adapters = {}
        for key in sorted(_kv("list")(prefix, namespace=_NAMESPACE)):
            record = _kv("get")(key, namespace=_NAMESPACE)
            if record is not None:  # else unloaded since the listing
                name = key[len(prefix):].decode()
                adapters[name] = _from_record(name, record)
        return adapters

    def check_runtime_updating(self) -> None:
        if self.scope is None:
            raise APIError("Loading and unloading LoRA adapters at run time is off: start the app with "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (or a Serve config's "
                           "allow_runtime_lora_updating: true).", 404)

    def found(self, name: str) -> tuple[str, str] | None:
        """(the folder, its base model's name or path) of the adapter the resolver's folder holds under `name`:
        a subfolder of exactly that name (never a path out of the folder) with a PEFT LoRA config."""
        if self.resolver_dir is None or not name or name in (".", "..") or os.path.basename(name) != name:
            return None
        folder = os.path.join(self.resolver_dir, name)
        try:
            with open(os.path.join(folder, "adapter_config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            return None
        return folder, config.get("base_model_name_or_path")

    def check_not_static(self, name: str) -> None:
        if name in self.static:
            raise APIError(f"The lora adapter '{name}' was given at start-up (--lora-modules): it cannot be "
                           f"replaced or unloaded.", type=INVALID)

    async def check_loadable(self, name: str, load_inplace: bool) -> None:
        """Refuse a name that cannot take a new adapter before any work: one of start-up, or one loaded already
        (unless `load_inplace`). `add` checks the latter again, atomically."""
        self.check_not_static(name)
        if not load_inplace and await self.resolve(name) is not None:
            raise _already_loaded(name)

    async def new_request(self, name: str, path: str) -> LoRARequest:
        """A LoRARequest for `path` under an id no adapter of this app had before (claimed in the store)."""
        claimed = _kv("put")
        if self._next_id is None:
            keys = await asyncio.to_thread(_kv("list"), self._key("id", ""), namespace=_NAMESPACE)
            self._next_id = max([int(k.rsplit(b"/", 1)[1]) + 1 for k in keys], default=_FIRST_RUNTIME_ID)
        while True:
            lora_int_id, self._next_id = self._next_id, self._next_id + 1
            existed = await asyncio.to_thread(claimed, self._key("id", str(lora_int_id)), name.encode(),
                                              overwrite=False, namespace=_NAMESPACE)
            if not existed:  # another replica may have claimed it first
                return LoRARequest(name, lora_int_id, path)

    async def add(self, base: str, lora: LoRARequest, load_inplace: bool) -> None:
        """Serve `lora` under its name, atomically across the app's replicas: a name already loaded is refused
        unless `load_inplace`, in which case the new adapter takes its place."""
        record = json.dumps({"base": base, "path": lora.lora_path, "id": lora.lora_int_id}).encode()
        existed = await asyncio.to_thread(_kv("put"), self._key("name", lora.lora_name), record,
                                          overwrite=load_inplace, namespace=_NAMESPACE)
        if existed and not load_inplace:  # another replica loaded it since `check_loadable`
            raise _already_loaded(lora.lora_name)

    async def remove(self, name: str) -> None:
        self.check_not_static(name)
        deleted = await asyncio.to_thread(_kv("del"), self._key("name", name), namespace=_NAMESPACE)
        if not deleted:
            raise APIError(f"The lora adapter '{name}' cannot be found.", 404)

    def _key(self, kind: str, name: str) -> bytes:
        return f"lora/{self.scope}/{kind}/{name}".encode()


def _already_loaded(name: str) -> APIError:
    return APIError(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                    f"set 'load_inplace' to True.", type=INVALID)


def _from_record(name: str, record: bytes) -> tuple[str, LoRARequest]:
    fields = json.loads(record)
    return fields["base"], LoRARequest(name, fields["id"], fields["path"])


def _kv(operation: str):
    """Ray's key-value store in the GCS (imported where first used: only replicas of apps that update adapters at
    run time touch it). Each call blocks on the GCS; callers run it on a thread, off the event loop."""
    from ray.experimental import internal_kv
    return {"get": internal_kv._internal_kv_get, "put": internal_kv._internal_kv_put,
            "del": internal_kv._internal_kv_del, "list": internal_kv._internal_kv_list}[operation]
