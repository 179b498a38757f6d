"""A worker: one device, one model shard, its slice of the paged KV cache, and the model runner.

In process it is driven by `UniprocExecutor`; the Ray executor wraps the same class in an actor
(`workers/ray_worker.py`), one per (pipeline stage, tensor rank).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from shardserve.config import EngineConfig, resolve_dtype
from shardserve.distributed.parallel_state import get_pp_group, get_tp_group, init_distributed
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.layers.attention import Attention, AttentionMetadata, get_attention_backend
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.layers.cpu_gemm import prepack_model, repack_changed
from shardserve.lora.adapter import AdapterCache
from shardserve.models import gguf
from shardserve.models.loader import check_all_loaded
from shardserve.models.pipeline import set_layer_partition
from shardserve.models.source import ModelSource, build_model, iterate_weights
from shardserve.profiler import WorkerProfiler
from shardserve.workers.cpu_malloc import keep_freed_memory, tcmalloc_hint, zeros_on_huge_pages
from shardserve.workers.cuda_graph import CudaGraphRunner
from shardserve.workers.model_runner import LaunchedStep, ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, rank: int = 0,
                 distributed_init_method: str | None = None):
        self.config = config
        self.source = source
        self.rank = rank
        self.device = config.torch_device
        self.dtype = resolve_dtype(config.dtype, source.hf_config, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
            hint = tcmalloc_hint(self.dtype)
            if hint:
                logger.info(hint)
        if config.world_size > 1:
            # Layers read their shard from the groups as they are built: join them first.
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            init_distributed(config.tensor_parallel_size, config.pipeline_parallel_size, rank,
                             distributed_init_method, backend)
        set_layer_partition(config.pp_layer_partition)
        torch.manual_seed(config.seed)
        self.model = build_model(source, self.dtype, self.device, config.load_format, config.seed)
        # Decode batches on a CPU are tens of rows: pack GEMM weights for that size.
        prepack_model(self.model, batch_hint=min(config.max_num_seqs, 32))
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if self.attention_layers:
            self.attention_backend = get_attention_backend(
                config.attention_backend, self.device, self.dtype, config.block_size,
                self.attention_layers[0].head_dim)
            for attn in self.attention_layers:
                attn.backend = self.attention_backend
            logger.info("Attention backend: %s", self.attention_backend.name)
        self.kv_caches: list[torch.Tensor] = []
        self.runner: ModelRunner | None = None
        pp_rank, tp_rank = divmod(rank, config.tensor_parallel_size)
        self.profiler = WorkerProfiler(config.profiler_config, f"pp{pp_rank}_tp{tp_rank}", self.device) \
            if config.profiler_config.profiler else None

    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * self.config.block_size * a.num_kv_heads * a.head_dim * elem for a in self.attention_layers)

    def determine_num_blocks(self) -> int:
        """On a GPU: what is left of `gpu_memory_utilization` of the device once the weights, the
        activations of a full step (profiled) and memory outside torch (CUDA context, NCCL, other processes)
        are counted. On a CPU: the byte budget."""
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.profile_run(self.config.max_num_batched_tokens, self.config.max_model_len)
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            outside_torch = total - free - torch.cuda.memory_reserved(self.device)
            budget = kv_cache_budget(total, self.config.gpu_memory_utilization, peak, outside_torch)
            logger.info("GPU memory: %.2f GiB total, %.2f GiB peak in torch (weights + a step of %d tokens), "
                        "%.2f GiB outside torch -> %.2f GiB for the KV cache", total / 2**30, peak / 2**30,
                        self.config.max_num_batched_tokens, outside_torch / 2**30, budget / 2**30)
            torch.cuda.empty_cache()
        else:
            budget = self.config.kv_cache_memory_bytes
        return max(budget // self.kv_bytes_per_block(), 0)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, max_model_len: int) -> None:
        """The largest step the scheduler can send, without a KV cache: `num_tokens` prompt tokens in
        prompts of at most max_model_len, then logits for up to max_num_seqs of them (and their drafts). What it
        allocates at its peak is what serving needs besides the weights and the cache."""
        lens = [max_model_len] * (num_tokens // max_model_len) + [num_tokens % max_model_len]
        lens = [n for n in lens if n]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        meta = AttentionMetadata(slot_mapping=None, block_size=self.config.block_size,
                                 prefills=[PrefillSeq(s, n, 0, None) for s, n in zip(starts, lens)])
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        intermediate = None
        if not get_pp_group().is_first:
            intermediate = {key: torch.zeros(num_tokens, self.source.hf_config.hidden_size, dtype=self.dtype,
                                             device=self.device) for key in self.model.intermediate_keys}
        hidden = self.model(input_ids, positions, meta, intermediate=intermediate)
        if get_pp_group().is_last:
            # (with speculative decoding each request's drafts get logits too)
            spec = self.config.speculative_config
            rows = min(self.config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec else 0)), num_tokens)
            self.model.compute_logits(hidden[:rows]).float().softmax(-1)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache once; the engine never grows or reallocates it."""
        bs = self.config.block_size
        self.kv_caches = []
        for attn in self.attention_layers:
            shape = (2, num_blocks, attn.num_kv_heads, bs, attn.head_dim)
            cache = zeros_on_huge_pages(shape, self.dtype) if self.device.type == "cpu" else \
                torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.kv_cache = cache
            self.kv_caches.append(cache)
        logger.debug("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs,
                    num_blocks * self.kv_bytes_per_block() / 2**20)
        self.runner = ModelRunner(self.model, bs, self.source.hf_config, self.dtype, self.device, self.config.seed)
        if self.config.enable_lora:
            self.runner.adapters = AdapterCache(self.model, self.config.max_cpu_loras or self.config.max_loras,
                                                self.config.max_lora_rank, self.dtype, self.device)
        if self.uses_cuda_graphs():
            sizes = self.config.cuda_graph_batch_sizes()
            max_blocks = -(-self.config.max_model_len // bs)
            self.runner.graphs = CudaGraphRunner(self.model, sizes, max_blocks, bs, self.device)
            self.runner.graphs.capture()

    def uses_cuda_graphs(self) -> bool:
        """Generation on a GPU, one pipeline stage (a stage's send/recv stays outside graphs) and one tensor rank
        (a captured NCCL all-reduce has not run on a multi-GPU machine of ours yet: eager until it has), an
        attention backend and a model that can be captured, and sizes to capture (none under enforce_eager)."""
        return (self.device.type == "cuda" and bool(self.config.cuda_graph_batch_sizes())
                and bool(self.attention_layers)
                and self.attention_backend.supports_cuda_graphs and get_pp_group().size == 1
                and get_tp_group().size == 1
                and getattr(self.model, "supports_cuda_graphs", True)
                and getattr(self.model, "pooling_kind", None) is None)

    @property
    def is_driver(self) -> bool:
        """The one rank whose sampled tokens the engine reads: tensor rank 0 of the last stage."""
        return get_pp_group().is_last and get_tp_group().is_first

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> ModelRunnerOutput | LaunchedStep | None:
        """`non_block`: return once the step is queued on the device (see `ModelRunner.execute_model`)."""
        if scheduler_output.blocks_to_copy:  # forked beams' partial blocks, before anything reads them
            src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*scheduler_output.blocks_to_copy))
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]
        output = self.runner.execute_model(scheduler_output, non_block)
        if self.profiler is not None:
            self.profiler.step()
        return output if self.is_driver else None

    def num_parameter_elements(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # a caller's calls (LLM.collective_rpc, apply_model), vLLM's worker methods --------------------------

    def execute_method(self, method: str | Callable, args: tuple = (), kwargs: dict | None = None) -> Any:
        """`method` (a method of this worker, or of the worker extension, by name; or a function called with
        this worker first), then the CPU GEMMs' packed copies of any weight it changed packed again, so a
        weight update is served at once whichever way it was written."""
        fn = getattr(self, method) if isinstance(method, str) else functools.partial(method, self)
        try:
            return fn(*args, **(kwargs or {}))
        finally:
            repack_changed(self.model)

    def get_model(self) -> nn.Module:
        """This rank's model: its tensor-parallel shard of the layers of its pipeline stage."""
        return self.model

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.model)

    def reload_weights(self, weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
                       weights_path: str | None = None, is_checkpoint_format: bool = True) -> None:
        """New weights in place, as vLLM's worker takes them: (name, tensor) pairs named as in the model's
        checkpoint (any subset: what changed), or a checkpoint folder or GGUF file of the same architecture, or
        with neither the model's own checkpoint again. Each rank copies its shard. The prefix cache still holds
        KV computed with the old weights: `LLM.reset_prefix_cache()` after the update, as in vLLM."""
        if not is_checkpoint_format:
            raise ValueError("reload_weights takes tensors named as in the model's checkpoint "
                             "(is_checkpoint_format=True); weights in this engine's own layout are not taken.")
        if weights_iterator is not None and weights_path is not None:
            raise ValueError("Pass reload_weights either weights_iterator or weights_path, not both.")
        if weights_iterator is not None:
            self.model.load_weights(weights_iterator)
            return
        source = self.source if weights_path is None else dataclasses.replace(
            self.source, path=weights_path, is_gguf=gguf.is_gguf_file(weights_path))
        load_format = self.config.load_format if weights_path is None else "auto"
        weights = iterate_weights(source, "auto" if load_format == "dummy" else load_format)
        check_all_loaded(self.model, self.model.load_weights(weights))  # a whole checkpoint covers the model

    def start_profile(self, prefix: str | None = None, delay_iterations: int | None = None,
                      max_iterations: int | None = None) -> None:
        self.profiler.start(prefix, delay_iterations, max_iterations)

    def stop_profile(self) -> None:
        self.profiler.stop()

    def load_model(self) -> None:
        """vLLM's: the checkpoint's weights, in place (after starting with load_format="dummy")."""
        self.reload_weights()


def worker_class(extension: str | None) -> type[Worker]:
    """`Worker`, or with vLLM's `worker_extension_cls` (a class's qualified name, "package.module.Class") a
    Worker that also has that class's methods, for `LLM.collective_rpc` to call by name. Its names may not
    shadow the worker's own."""
    if not extension:
        return Worker
    module_name, _, class_name = extension.rpartition(".")
    try:
        ext = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError):
        ext = None
    if not isinstance(ext, type):
        raise ValueError(f"worker_extension_cls={extension!r} is not an importable class "
                         f"(give its qualified name, package.module.Class).")
    clashes = sorted(n for n in vars(ext) if not n.startswith("__") and hasattr(Worker, n))
    if clashes:
        raise ValueError(f"worker_extension_cls {extension} would replace the worker's own "
                         f"{', '.join(clashes)}; rename them.")
    return type(f"Worker+{class_name}", (Worker, ext), {})


def kv_cache_budget(total_bytes: int, utilization: float, peak_torch_bytes: int, outside_torch_bytes: int) -> int:
    """Bytes left for the KV cache when this engine may use `utilization` of a device of `total_bytes`."""
    return int(total_bytes * utilization) - peak_torch_bytes - outside_torch_bytes
