"""vLLM's compilation options, read for what they mean here: which decode steps replay a CUDA graph.

A vLLM script may pass `compilation_config` (an int, its torch.compile mode, or a dict of vLLM's
CompilationConfig fields), `cudagraph_capture_sizes`, `max_cudagraph_capture_size` and `optimization_level`
(`-O0` .. `-O3`). shardserve runs no torch.compile: what vLLM's compiler passes fuse (residual add + RMSNorm,
rotary with the KV store, the gated activation) are kernels of its own on both devices, and a decode step is
already one CUDA graph (benchmarks/RESULTS.md, 2026-12-05: the probe that tried it). So the compile mode and the
torch.compile fields are taken and said to do nothing here. `cudagraph_mode` NONE (and `-O0`, whose default it
is) turns the graphs off, as `enforce_eager` does; every other mode captures what FULL_DECODE_ONLY does: decode
steps whole, padded up to the next captured size, and mixed or prefill steps eager.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)
_said: set[str] = set()  # each message once a process: an engine's config is made more than once at start-up

COMPILATION_MODES = ("NONE", "STOCK_TORCH_COMPILE", "DYNAMO_TRACE_ONCE", "VLLM_COMPILE")
CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
# vLLM's CompilationConfig fields (0.32) that configure torch.compile or its piecewise graphs, nothing of ours
TORCH_COMPILE_FIELDS = frozenset({
    "debug_dump_path", "cache_dir", "compile_cache_save_format", "backend", "custom_ops", "ir_enable_torch_wrap",
    "splitting_ops", "compile_mm_encoder", "cudagraph_mm_encoder", "encoder_cudagraph_token_budgets",
    "encoder_cudagraph_max_vision_items_per_batch", "encoder_cudagraph_max_frames_per_batch",
    "cudagraph_decoder_replay", "decoder_replay_cudagraph_capture_sizes", "decoder_replay_trim_threshold",
    "compile_sizes", "compile_ranges_endpoints", "inductor_compile_config", "inductor_passes",
    "cudagraph_num_of_warmups", "cudagraph_copy_inputs", "cudagraph_specialize_lora",
    "use_inductor_graph_partition", "pass_config", "dynamic_shapes_config", "fast_moe_cold_start"})
GRAPH_FIELDS = frozenset({"mode", "level", "cudagraph_mode", "cudagraph_capture_sizes", "max_cudagraph_capture_size"})


@dataclass
class CudaGraphOptions:
    enabled: bool                  # decode steps replay CUDA graphs (where the device and model allow)
    sizes: list[int] | None        # the batch sizes to capture, as asked; None: the default list
    max_size: int | None           # the largest default size; None: max_num_seqs


def _say_once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


def _named(value: Any, names: tuple[str, ...], what: str) -> str:
    """An enum value as vLLM takes it (its name in any case, or its number) -> the name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and value.upper() in names:
        return value.upper()
    raise ValueError(f"{what} must be one of {', '.join(names)}, got {value!r}.")


def _sizes(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or \
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value):
        raise ValueError(f"{what} must be a list of positive integers, got {value!r}.")
    return sorted(set(value))


def _one_of(options: dict[str, Any], what: str) -> Any:
    """The one option given of several that say the same thing (None if none is)."""
    given = {name: value for name, value in options.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are mutually exclusive: give {what} once.")
    return next(iter(given.values()), None)


def resolve(compilation_config: int | dict | None, cudagraph_capture_sizes: list[int] | None = None,
            max_cudagraph_capture_size: int | None = None, optimization_level: int | None = None,
            cuda_graph_sizes: list[int] | None = None) -> CudaGraphOptions:
    """What the options ask of the decode graphs; ValueError for what vLLM would refuse too (an unknown field,
    a mode that does not exist, sizes given twice). `cuda_graph_sizes` is vLLM's older name for the sizes."""
    if compilation_config is None:
        config = {}
    elif isinstance(compilation_config, dict):
        config = dict(compilation_config)
    elif isinstance(compilation_config, int) and not isinstance(compilation_config, bool):
        config = {"mode": compilation_config}
    else:
        raise ValueError(f"compilation_config must be an int (the compilation mode) or a dict of "
                         f"CompilationConfig fields, got {compilation_config!r}.")
    unknown = set(config) - GRAPH_FIELDS - TORCH_COMPILE_FIELDS
    if unknown:
        raise ValueError(f"compilation_config has no field {', '.join(sorted(unknown))}.")
    if optimization_level is not None and (isinstance(optimization_level, bool) or optimization_level not in range(4)):
        raise ValueError(f"optimization_level must be 0, 1, 2 or 3, got {optimization_level!r}.")
    mode = _one_of({"compilation_config.mode": config.get("mode"), "compilation_config.level": config.get("level")},
                   "the compilation mode")
    if mode is not None and _named(mode, COMPILATION_MODES, "compilation_config.mode") != "NONE":
        _say_once(logging.INFO, f"compilation_config mode {mode}: shardserve runs no torch.compile (its fused "
                                f"kernels are its own); decode steps replay CUDA graphs as FULL_DECODE_ONLY does.")
    ignored = sorted(set(config) & TORCH_COMPILE_FIELDS)
    if ignored:
        _say_once(logging.WARNING, f"compilation_config {', '.join(ignored)}: torch.compile options, which "
                                   f"shardserve does not use; ignored.")
    cudagraph_mode = config.get("cudagraph_mode")
    if cudagraph_mode is not None:
        cudagraph_mode = _named(cudagraph_mode, CUDAGRAPH_MODES, "compilation_config.cudagraph_mode")
    elif optimization_level == 0:
        cudagraph_mode = "NONE"  # vLLM's -O0 default
    if cudagraph_mode not in (None, "NONE", "FULL_DECODE_ONLY"):
        _say_once(logging.INFO, f"cudagraph_mode {cudagraph_mode}: decode steps replay whole CUDA graphs, mixed and "
                                f"prefill steps run eagerly (FULL_DECODE_ONLY).")
    sizes = _one_of({"cudagraph_capture_sizes": cudagraph_capture_sizes,
                     "compilation_config.cudagraph_capture_sizes": config.get("cudagraph_capture_sizes"),
                     "cuda_graph_sizes": cuda_graph_sizes}, "the capture sizes")
    sizes = None if sizes is None else _sizes(sizes, "cudagraph_capture_sizes")
    max_size = _one_of({"max_cudagraph_capture_size": max_cudagraph_capture_size,
                        "compilation_config.max_cudagraph_capture_size": config.get("max_cudagraph_capture_size")},
                       "the largest capture size")
    if max_size is not None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"max_cudagraph_capture_size must be a non-negative integer, got {max_size!r}.")
        if sizes is not None and max_size != sizes[-1]:
            raise ValueError(f"max_cudagraph_capture_size ({max_size}) must be the largest of "
                             f"cudagraph_capture_sizes ({sizes[-1]}) where both are given.")
    return CudaGraphOptions(enabled=cudagraph_mode != "NONE" and max_size != 0, sizes=sizes, max_size=max_size)
