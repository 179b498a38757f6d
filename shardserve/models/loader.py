"""Streaming weights out of a checkpoint directory into a model's (sharded) parameters.

Tensors are read one at a time (safetensors memory-maps its files; .bin files are loaded with
`weights_only=True`), handed to the parameter's `weight_loader`, and dropped: the full model is never
built twice and a tensor-parallel rank copies only its slice.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn


def iterate_checkpoint(model_dir: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """The folder's tensors: its *.safetensors files, else (or with vLLM's load_format "pt") its *.bin files."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))) if load_format != "pt" else []
    if files:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(p for p in glob.glob(os.path.join(model_dir, "*.bin")) if "training_args" not in p) \
        if load_format != "safetensors" else []
    if not bins:
        wanted = {"safetensors": "*.safetensors", "pt": "*.bin"}.get(load_format, "*.safetensors or *.bin")
        raise ValueError(f"No weights ({wanted}) found in model directory {model_dir!r}.")
    for path in bins:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        del state


# "<layer>.experts.<e>.<projection>.weight": one expert's projection, in a mixture-of-experts layer
_EXPERT_WEIGHT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                stacked_params: list[tuple[str, str, object]] = (), skip: tuple[str, ...] = (),
                expert_projections: dict[str, tuple[str, str]] | None = None) -> set[str]:
    """Copy checkpoint tensors into `model`, in place; returns the names of the parameters they account for
    (loaded, or left out by design: a `skip` name such as a tied head). Any subset of the checkpoint may come:
    a weight update (`LLM.collective_rpc("reload_weights", ...)`, or `model.load_weights` in `apply_model`)
    sends what changed; `check_all_loaded` holds a model's first load to every parameter.

    `stacked_params` maps a checkpoint name part to the merged parameter that holds it and its shard id.
    `expert_projections` maps the projection names of per-expert checkpoint tensors to the stacked parameter
    of the experts (layers/fused_moe.py) that holds them and the projection's name there.
    Copies go into the parameters themselves, not their `.data`, so each bumps its parameter's version: what is
    derived from a weight (a packed copy for CPU GEMMs) sees the change (cpu_gemm.repack_changed).
    """
    params = dict(model.named_parameters())
    loaded: set[str] = {n for n in params if any(s in n for s in skip)}
    with torch.no_grad():
        for name, tensor in weights:
            if any(s in name for s in skip):
                continue
            expert = _EXPERT_WEIGHT.fullmatch(name) if expert_projections else None
            if expert and expert[3] in expert_projections:
                stacked, projection = expert_projections[expert[3]]
                target = f"{expert[1]}.{stacked}"
                if target in params:
                    params[target].weight_loader(params[target], tensor, (int(expert[2]), projection))
                    loaded.add(target)
                continue
            for part, merged, shard_id in stacked_params:
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{merged}.")
                    if target in params:
                        params[target].weight_loader(params[target], tensor, shard_id)
                        loaded.add(target)
                        break
            else:
                if name not in params:
                    continue  # buffers and heads this model does not use
                param = params[name]
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.copy_(tensor)
                else:
                    loader(param, tensor)
                loaded.add(name)
    return loaded


def initialize_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """vLLM's load_format="dummy": every parameter uniform in [low, high) instead of a checkpoint's (to measure
    or to start a model whose weights a trainer sends later: `collective_rpc("load_model")`)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            values = torch.empty(param.shape, dtype=torch.float32).uniform_(low, high, generator=generator)
            param.copy_(values)


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Raise if a parameter of the model received no weight from its checkpoint."""
    missing = {name for name, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(f"Checkpoint has no weights for: {', '.join(sorted(missing)[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
