"""Engine configuration: what the user asked for, resolved against the model's own config once."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from shardserve import compilation
from shardserve.engine.reasoning import REASONING_PARSERS
from shardserve.engine.speculative import SpeculativeConfig
from shardserve.pooler_config import PoolerConfig
from shardserve.profiler import ProfilerConfig

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, hf_config, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(set(_DTYPES)))}.")
        return _DTYPES[dtype]
    config_dtype = getattr(hf_config, "dtype", None)  # transformers >= 4.56 names it dtype
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    if device.type == "cpu":
        # A bf16 checkpoint runs in bf16 where oneDNN multiplies bf16 (AVX-512 and up), as vLLM runs it there;
        # the fused kernels and decode attention take bf16 too. Otherwise fp32: fp16 arithmetic and bf16 on an
        # AVX2-only CPU are slow, and the random test models are fp32.
        from shardserve.layers.cpu_gemm import onednn_bf16_available
        return torch.bfloat16 if config_dtype == torch.bfloat16 and onednn_bf16_available() else torch.float32
    return torch.float32 if config_dtype is None else config_dtype


LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")  # vLLM's load_format values taken here


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    served_model_name: str | None = None   # the name clients use (in messages), when it is not `model`
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # vLLM's scheduling policy: "fcfs" serves requests in arrival order; "priority" by each request's
    # priority (lower first), arrival breaking ties, and under KV pressure preempts the lowest-priority one.
    scheduling_policy: str = "fcfs"
    # vLLM's enable_chunked_prefill (None: on): a prompt longer than what is left of a step's budget is prefilled
    # in chunks over several steps; off, it waits for a step with room for all of it (the budget must then hold
    # max_model_len).
    enable_chunked_prefill: bool | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    # KV-cache budget: on CPU a byte budget, on GPU a fraction of free memory.
    kv_cache_memory_bytes: int | None = None
    # vLLM's kv_cache_dtype: the cache is kept in the model's dtype ("auto", or that dtype's name); no fp8 cache
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    device: str = "auto"
    # Attention kernels: auto, torch, cpu, triton, flash_attn, or vLLM's name of one (layers/attention/backend.py);
    # None: the SHARDSERVE_ATTENTION_BACKEND environment variable, else auto. vLLM's attention_config gives it as
    # {"backend": name}.
    attention_backend: str | None = None
    attention_config: dict | None = None
    # CUDA graphs replay decode steps of up to the largest captured batch size (a batch pads up to the next
    # size); enforce_eager turns them off. The sizes: cudagraph_capture_sizes (vLLM's; cuda_graph_sizes is its
    # older name), else 1, 2, 4, 8, then multiples of 16 up to max_num_seqs or max_cudagraph_capture_size.
    # compilation_config and optimization_level as a vLLM script passes them (compilation.py: no torch.compile
    # here; cudagraph_mode NONE, or optimization level 0, is enforce_eager).
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    cudagraph_capture_sizes: list[int] | None = None
    max_cudagraph_capture_size: int | None = None
    compilation_config: int | dict | None = None
    optimization_level: int | None = None
    # vLLM's async_scheduling: the next step is scheduled and queued on the device while the engine reads the
    # one in flight (so the host's share of a step overlaps the device's). Only the in-process executor can;
    # a batch with a request whose sampling reads its own outputs (penalties, bad words, a grammar, beams) or
    # asks for prompt logprobs runs step by step. None: on where it pays, a GPU.
    async_scheduling: bool | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    # vLLM's quantization: None, or "gguf" for a GGUF file (its weights are dequantized to `dtype` at load)
    quantization: str | None = None
    # vLLM's load_format: "auto" (safetensors, else .bin, or the GGUF file), "safetensors", "pt", "gguf", or
    # "dummy" (random weights: measuring, or weights a trainer sends later through collective_rpc)
    load_format: str = "auto"
    # vLLM's tokenizer_mode: "auto" (and "hf"), the Hugging Face fast tokenizer
    tokenizer_mode: str = "auto"
    hf_overrides: dict = field(default_factory=dict)
    # Sampling defaults for what a request leaves out (engine/generation_config.py): "auto", the model's
    # generation_config.json; "vllm", none; or a folder holding one. The overrides go on top.
    generation_config: str = "auto"
    override_generation_config: dict = field(default_factory=dict)
    # The most logprobs (or prompt logprobs) one request may ask for; -1: the whole vocabulary (vLLM's).
    max_logprobs: int = 20
    # vLLM's structured_outputs_config: {"backend": "auto" | "xgrammar", "disable_any_whitespace": bool,
    # "enable_in_reasoning": bool}: disable_any_whitespace for every request's JSON (a request may also ask for it
    # itself); enable_in_reasoning constrains a reasoning model's thinking too (by default only its answer).
    structured_outputs_config: dict = field(default_factory=dict)
    # vLLM's --reasoning-parser: the model family's thinking tags (engine/reasoning.py). Structured outputs then
    # start after the thinking; the chat server returns it as `reasoning`.
    reasoning_parser: str | None = None
    # vLLM's LoRA options: requests may run through PEFT LoRA adapters (lora/) of ranks up to max_lora_rank;
    # max_loras of them at once, and each worker keeps up to max_cpu_loras loaded (None: max_loras), so that a
    # request of a recent adapter does not read it from disk again.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    skip_tokenizer_init: bool = False
    enable_prompt_embeds: bool = False
    # Parallelism: T x P worker shards per replica; "ray" runs them as actors, "uni" in this process.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None   # None: "ray" when T x P > 1, else "uni"
    pp_layer_partition: list[int] | None = None       # layers per stage; None splits evenly
    ray_address: str | None = None                    # None: RAY_ADDRESS, else a local cluster
    num_cpus_per_worker: float = 1.0                  # a CPU worker's bundle; also its torch threads
    placement_group_strategy: str = "PACK"
    # vLLM's profiler_config ({"profiler": "torch", "torch_profiler_dir": ...}: profiler.py), for
    # LLM.start_profile / stop_profile
    profiler_config: ProfilerConfig | dict | None = None
    # vLLM's worker_extension_cls: "package.module.Class" whose methods every worker also has, for
    # LLM.collective_rpc to call by name (a Ray worker imports it: it must be importable there)
    worker_extension_cls: str | None = None
    # What the model runs as: "generate", "pooling", or "auto" (pooling for encoders and classifiers);
    # `convert` turns a causal LM into an embed / classify / reward model; `task` is vLLM's older spelling.
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    pooler_config: PoolerConfig | dict | str | None = None  # how a pooling model pools (overrides the model's)
    # vLLM's --stream-interval: a streamed request gets an output every this many new tokens (the first and
    # the last at once); a request's own stream_interval can raise it. 1: every token.
    stream_interval: int = 1
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": ...,
    # "prompt_lookup_min": ...}: up to k draft tokens a step from n-gram lookup (engine/speculative.py)
    speculative_config: SpeculativeConfig | dict | None = None

    def __post_init__(self) -> None:
        self.profiler_config = ProfilerConfig.parse(self.profiler_config)
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.distributed_executor_backend is None:
            self.distributed_executor_backend = "ray" if self.world_size > 1 else "uni"
        if self.distributed_executor_backend not in ("ray", "uni"):
            raise ValueError(f"distributed_executor_backend must be 'ray' or 'uni', got "
                             f"{self.distributed_executor_backend!r}.")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} needs "
                             f"distributed_executor_backend='ray'; the in-process executor runs one shard.")
        if self.placement_group_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_group_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got "
                             f"{self.placement_group_strategy!r}.")
        if self.num_cpus_per_worker <= 0:
            raise ValueError(f"num_cpus_per_worker must be > 0, got {self.num_cpus_per_worker}.")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}.")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise ValueError(f"stream_interval must be an integer of at least 1, got {self.stream_interval!r}.")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}.")
        unknown = set(self.structured_outputs_config) - {"backend", "disable_any_whitespace", "enable_in_reasoning"}
        if unknown:
            raise ValueError(f"structured_outputs_config takes backend, disable_any_whitespace and "
                             f"enable_in_reasoning, got {', '.join(sorted(unknown))}.")
        for name in ("max_loras", "max_lora_rank") + (("max_cpu_loras",) if self.max_cpu_loras is not None else ()):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or \
                    getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras!r}) must be an integer of at least max_loras "
                             f"({self.max_loras}).")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got "
                             f"{self.reasoning_parser!r}.")
        if self.structured_outputs_config.get("backend", "auto") not in ("auto", "xgrammar"):
            raise ValueError(f"structured_outputs_config backend {self.structured_outputs_config['backend']!r} is not "
                             f"available: structured outputs run on xgrammar ('auto' or 'xgrammar').")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported: the KV cache is kept in the "
                             f"model's dtype ('auto', or that dtype's name).")
        if self.quantization not in (None, "gguf"):
            raise ValueError(f"quantization {self.quantization!r} is not supported: shardserve runs unquantized "
                             f"checkpoints, and GGUF files ('gguf') with their weights dequantized at load.")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} is not supported: one of {', '.join(LOAD_FORMATS)}.")
        if self.tokenizer_mode not in ("auto", "hf"):
            raise ValueError(f"tokenizer_mode {self.tokenizer_mode!r} is not supported: the model's Hugging Face "
                             f"fast tokenizer is used ('auto' or 'hf').")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no cap) or non-negative, got {self.max_logprobs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.attention_config:
            if set(self.attention_config) != {"backend"}:
                raise ValueError(f"attention_config takes backend (the attention kernels) here, got "
                                 f"{', '.join(sorted(self.attention_config))}.")
            if self.attention_backend is not None:
                raise ValueError("attention_backend and attention_config.backend are mutually exclusive: give the "
                                 "attention backend once.")
            # (moved into attention_backend, so that a copy of this config does not read it twice)
            self.attention_backend, self.attention_config = self.attention_config["backend"], None
        self.cuda_graphs = compilation.resolve(self.compilation_config, self.cudagraph_capture_sizes,
                                               self.max_cudagraph_capture_size, self.optimization_level,
                                               self.cuda_graph_sizes)
        if self.kv_cache_memory_bytes is None:
            gib = float(os.environ.get("SHARDSERVE_CPU_KVCACHE_SPACE", "4"))
            self.kv_cache_memory_bytes = int(gib * (1 << 30))

    def cuda_graph_batch_sizes(self) -> list[int]:
        """The decode batch sizes captured as CUDA graphs where the device and model allow them; [] for none."""
        if self.enforce_eager or not self.cuda_graphs.enabled:
            return []
        if self.cuda_graphs.sizes is not None:
            return self.cuda_graphs.sizes
        from shardserve.workers.cuda_graph import default_graph_sizes
        return default_graph_sizes(min(self.max_num_seqs, self.cuda_graphs.max_size or self.max_num_seqs))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
