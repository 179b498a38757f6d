"""What to serve: one `ModelSpec` per model of the app (the CLI's flags, or a Serve config's args)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from shardserve.config import EngineConfig
from shardserve.entrypoints.chat_utils import check_content_format
from shardserve.lora.adapter import read_adapter_config
from shardserve.lora.request import LoRARequest
from shardserve.router.tool_calls import TOOL_CALL_PARSERS
from shardserve.router.tool_tags import ToolStrictLevel, strict_tool_calling
from shardserve.workers.cpu_malloc import tcmalloc_env


@dataclass
class ModelSpec:
    model: str
    served_model_name: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"               # cuda, cpu, or auto: cuda when the Ray cluster has GPUs
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_prompt_embeds: bool = False
    chat_template: str | None = None
    chat_template_content_format: str = "auto"   # vLLM's: how content parts reach the template (chat_utils.py)
    enable_prompt_tokens_details: bool = False   # usage reports the prompt tokens the prefix cache served
    enable_auto_tool_choice: bool = False        # chat's tool_choice "auto", read by tool_call_parser
    tool_call_parser: str | None = None          # the model family's tool-call format (router/tool_calls.py)
    tool_strict_level: str = "auto"              # vLLM's --tool-strict-level: auto, function, parameter (tool_tags.py)
    # vLLM's VLLM_ENFORCE_STRICT_TOOL_CALLING (None: that variable where the spec is made; default on)
    strict_tool_calling: bool | None = None
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    runner: str = "auto"
    convert: str = "auto"
    pooler_config: dict[str, Any] | str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    generation_config: str = "auto"    # sampling defaults: the model's (auto), vLLM's own (vllm), or a folder's
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    max_logprobs: int = 20
    structured_outputs_config: dict[str, Any] = field(default_factory=dict)   # vLLM's: backend, disable_any_whitespace
    reasoning_parser: str | None = None          # the model family's thinking tags (engine/reasoning.py)
    # LoRA (vLLM's --enable-lora --lora-modules name=path ...): each adapter is served under its own name
    enable_lora: bool = False
    lora_modules: dict[str, str] | list = field(default_factory=dict)   # name -> PEFT adapter folder
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    scheduling_policy: str = "fcfs"
    enable_chunked_prefill: bool | None = None   # None: on
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    tokenizer_mode: str = "auto"
    load_format: str = "auto"
    gpu_memory_utilization: float = 0.9
    attention_backend: str | None = None
    attention_config: dict[str, Any] | None = None   # vLLM's: {"backend": name}
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    cudagraph_capture_sizes: list[int] | None = None   # vLLM's name for cuda_graph_sizes
    max_cudagraph_capture_size: int | None = None
    compilation_config: int | dict[str, Any] | None = None   # vLLM's (shardserve/compilation.py)
    optimization_level: int | None = None
    async_scheduling: bool | None = None   # None: on a GPU (EngineConfig)
    speculative_config: dict[str, Any] | None = None   # vLLM's: {"method": "ngram", "num_speculative_tokens": k}
    # Serve
    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_ongoing_requests: int = 256
    num_cpus: float = 1.0              # the replica's CPU bundle; its engine runs that many threads
    num_cpus_per_worker: float = 1.0   # each TP/PP worker's bundle
    stream_interval: int = 1           # vLLM's --stream-interval: tokens per streamed output (EngineConfig)
    stream_interval_s: float = 0.0     # at most one streamed batch of tokens per interval (0: every step)

    def __post_init__(self) -> None:
        self.lora_modules = _lora_modules(self.lora_modules)
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules (--lora-modules) requires enable_lora (--enable-lora).")
        self.engine_config()  # the engine's own checks, where the spec is made (the CLI, a Serve config)
        for path in self.lora_modules.values():  # an adapter the engine cannot apply fails here too
            read_adapter_config(path, self.max_lora_rank)
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}.")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice requires tool_call_parser (--tool-call-parser).")
        ToolStrictLevel.from_name(self.tool_strict_level)
        check_content_format(self.chat_template_content_format)
        if self.strict_tool_calling is None:
            self.strict_tool_calling = strict_tool_calling()

    def lora_requests(self) -> dict[str, LoRARequest]:
        """Each adapter's request, by its served name (ids in the order given)."""
        return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(self.lora_modules.items())}

    def tool_parser(self):
        """The parser of "auto" tool calls, where they are enabled."""
        return TOOL_CALL_PARSERS[self.tool_call_parser]() if self.enable_auto_tool_choice else None

    def tool_strict(self) -> ToolStrictLevel | None:
        """The strict level of tool calls in the parser's format, None where strict tool calling is off."""
        return ToolStrictLevel.from_name(self.tool_strict_level) if self.strict_tool_calling else None

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, served_model_name=self.name, tokenizer=self.tokenizer, dtype=self.dtype, seed=self.seed,
            revision=self.revision, trust_remote_code=self.trust_remote_code, generation_config=self.generation_config,
            override_generation_config=dict(self.override_generation_config), max_logprobs=self.max_logprobs,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            scheduling_policy=self.scheduling_policy, enable_chunked_prefill=self.enable_chunked_prefill,
            kv_cache_dtype=self.kv_cache_dtype, quantization=self.quantization, tokenizer_mode=self.tokenizer_mode,
            load_format=self.load_format,
            structured_outputs_config=dict(self.structured_outputs_config),
            reasoning_parser=self.reasoning_parser, enable_lora=self.enable_lora, max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank, max_cpu_loras=self.max_cpu_loras,
            block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes, hf_overrides=dict(self.hf_overrides),
            enable_prompt_embeds=self.enable_prompt_embeds, tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size, num_cpus_per_worker=self.num_cpus_per_worker,
            runner=self.runner, convert=self.convert, pooler_config=self.pooler_config,
            gpu_memory_utilization=self.gpu_memory_utilization, attention_backend=self.attention_backend,
            attention_config=self.attention_config,
            enforce_eager=self.enforce_eager, cuda_graph_sizes=self.cuda_graph_sizes,
            cudagraph_capture_sizes=self.cudagraph_capture_sizes,
            max_cudagraph_capture_size=self.max_cudagraph_capture_size,
            compilation_config=self.compilation_config, optimization_level=self.optimization_level,
            async_scheduling=self.async_scheduling, stream_interval=self.stream_interval,
            speculative_config=self.speculative_config, device=self.resolved_device())

    def deployment_options(self, index: int) -> dict[str, Any]:
        options: dict[str, Any] = {"name": f"model-{index}", "max_ongoing_requests": self.max_ongoing_requests}
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            options["autoscaling_config"] = {"min_replicas": low,
                                             "max_replicas": max(low, self.max_replicas or low),
                                             "target_ongoing_requests": max(1, self.max_num_seqs // 2)}
        else:
            options["num_replicas"] = self.num_replicas
        on_gpu = self.resolved_device() == "cuda"
        if self.world_size > 1:
            # Bundle 0 is the replica, one bundle per worker after it: Serve reserves and restarts them together.
            worker = {"CPU": self.num_cpus_per_worker, **({"GPU": 1.0} if on_gpu else {})}
            options["placement_group_bundles"] = [{"CPU": self.num_cpus}] + [worker] * self.world_size
            options["placement_group_strategy"] = "PACK"
        # OpenMP and MKL size their pools from the environment at start-up (Ray would otherwise pin them
        # to one thread): give the replica's kernels the cores it reserved. Serve runs the replica's code on
        # the event loop of its HTTP server (HAProxy mode) rather than on a second loop in another thread:
        # every streamed chunk would otherwise cross between the two threads, and the engine's hand-off
        # (async_engine) could not see the chunks written. The code never blocks that loop: the engine
        # steps in its own thread, health pings run in one.
        # A replica that runs a CPU model starts on tcmalloc where it is installed (workers/cpu_malloc.py).
        threads = str(self.num_threads)
        options["ray_actor_options"] = {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": {
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "SHARDSERVE_NUM_THREADS": threads,
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **({} if on_gpu else tcmalloc_env())}}}
        if on_gpu and self.world_size == 1:  # the replica runs the model itself: Ray must give it the GPU
            options["ray_actor_options"]["num_gpus"] = 1
        return options

    def resolved_device(self) -> str:
        """`auto` is decided where the app is built, not in each replica: a replica whose workers hold the
        GPUs has none itself and would otherwise pick the CPU."""
        if self.device != "auto":
            return self.device
        import ray
        if ray.is_initialized():
            return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def num_threads(self) -> int:
        return max(1, round(self.num_cpus))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lora_modules(modules: dict[str, str] | list) -> dict[str, str]:
    """Adapters by name, from a {name: path} mapping or vLLM's --lora-modules items ("name=path", or JSON objects
    with "name" and "path")."""
    if isinstance(modules, dict):
        items = list(modules.items())
    else:
        items = []
        for item in modules:
            if isinstance(item, str) and item.lstrip().startswith("{"):
                item = json.loads(item)
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("path"), str):
                items.append((item["name"], item["path"]))
            elif isinstance(item, str) and "=" in item:
                items.append(tuple(item.split("=", 1)))
            else:
                raise ValueError(f"A LoRA module is name=path or {{\"name\": ..., \"path\": ...}}, got {item!r}.")
    if any(not name or not path for name, path in items):
        raise ValueError("Each LoRA module needs a name and a path.")
    if len({name for name, _ in items}) != len(items):
        raise ValueError(f"LoRA module names must be unique, got {[name for name, _ in items]}.")
    return dict(items)
