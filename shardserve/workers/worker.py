"""A worker: one device, one model shard, its slice of the paged KV cache, and the model runner.

In process it is driven by `UniprocExecutor`; the Ray executor wraps the same class in an actor.
"""
from __future__ import annotations

import logging

import torch

from shardserve.config import EngineConfig, resolve_dtype
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.layers.attention import Attention
from shardserve.layers.cpu_gemm import prepack_model
from shardserve.models.source import ModelSource, build_model
from shardserve.workers.model_runner import ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        self.source = source
        self.device = config.torch_device
        self.dtype = resolve_dtype(config.dtype, source.hf_config, self.device)
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
        self.runner = ModelRunner(self.model, bs, self.source.hf_config.vocab_size, self.device, self.config.seed)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)
