"""A worker: one device, one model shard, its slice of the paged KV cache, and the model runner.

In process it is driven by `UniprocExecutor`; the Ray executor wraps the same class in an actor
(`workers/ray_worker.py`), one per (pipeline stage, tensor rank).
"""
from __future__ import annotations

import logging

import torch

from shardserve.config import EngineConfig, resolve_dtype
from shardserve.distributed.parallel_state import get_pp_group, get_tp_group, init_distributed
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.layers.attention import Attention
from shardserve.layers.cpu_gemm import prepack_model
from shardserve.models.pipeline import set_layer_partition
from shardserve.models.source import ModelSource, build_model
from shardserve.workers.model_runner import ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, rank: int = 0,
                 distributed_init_method: str | None = None):
        self.config = config
        self.source = source
        self.rank = rank
        self.device = config.torch_device
        self.dtype = resolve_dtype(config.dtype, source.hf_config, self.device)
        if config.world_size > 1:
            # Layers read their shard from the groups as they are built: join them first.
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            init_distributed(config.tensor_parallel_size, config.pipeline_parallel_size, rank,
                             distributed_init_method, backend)
        set_layer_partition(config.pp_layer_partition)
        torch.manual_seed(config.seed)
        self.model = build_model(source, self.dtype, self.device)
        # Decode batches on a CPU are tens of rows: pack GEMM weights for that size.
        prepack_model(self.model, batch_hint=min(config.max_num_seqs, 32))
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_caches: list[torch.Tensor] = []
        self.runner: ModelRunner | None = None

    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * self.config.block_size * a.num_kv_heads * a.head_dim * elem for a in self.attention_layers)

    def determine_num_blocks(self) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.gpu_memory_utilization)
        else:
            budget = self.config.kv_cache_memory_bytes
        return max(budget // self.kv_bytes_per_block(), 0)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache once; the engine never grows or reallocates it."""
        bs = self.config.block_size
        self.kv_caches = []
        for attn in self.attention_layers:
            cache = torch.zeros(2, num_blocks, attn.num_kv_heads, bs, attn.head_dim, dtype=self.dtype,
                                device=self.device)
            attn.kv_cache = cache
            self.kv_caches.append(cache)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs,
                    num_blocks * self.kv_bytes_per_block() / 2**20)
        self.runner = ModelRunner(self.model, bs, self.source.hf_config, self.dtype, self.device, self.config.seed)

    @property
    def is_driver(self) -> bool:
        """The one rank whose sampled tokens the engine reads: tensor rank 0 of the last stage."""
        return get_pp_group().is_last and get_tp_group().is_first

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        if scheduler_output.blocks_to_copy:  # forked beams' partial blocks, before anything reads them
            src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*scheduler_output.blocks_to_copy))
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]
        output = self.runner.execute_model(scheduler_output)
        return output if self.is_driver else None

    def num_parameter_elements(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
