"""The offline API, shaped like vLLM's `LLM`: a vLLM script runs with only its import changed."""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from shardserve.beam_search import BeamSearchOutput, BeamSearchParams, EngineBeamStepper, run_beam_search
from shardserve.config import EngineConfig
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.processor import TokenizationParams
from shardserve.entrypoints.chat_utils import load_chat_template, render_chat
from shardserve.entrypoints.pooling import PoolingMixin
from shardserve.inputs import PromptType, TextPrompt
from shardserve.lora.request import LoRARequest
from shardserve.outputs import PoolingRequestOutput, RequestOutput
from shardserve.pooler_config import PoolerConfig
from shardserve.pooling_params import PoolingParams
from shardserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def _any(value) -> bool:
    return True


# vLLM engine options a vLLM script may pass that change nothing here at the values taken; another value is
# refused with what shardserve does instead (rather than an unexpected-argument error, or silently).
_NEUTRAL_OPTIONS = {
    "disable_log_stats": (_any, ""), "swap_space": (_any, ""), "use_tqdm_on_load": (_any, ""),
    "disable_custom_all_reduce": (_any, ""),   # tensor ranks on a GPU all-reduce with NCCL either way
    "served_model_name": (_any, ""),           # offline outputs carry no model name
    "data_parallel_size": (lambda v: v == 1, "data parallelism here is replicas of the model behind one router "
                                             "(shardserve serve's --num-replicas)"),
    "enable_sleep_mode": (lambda v: not v, "sleep mode is not built (LLM.sleep)"),
    "cpu_offload_gb": (lambda v: not v, "weights stay in the device's memory"),
    "logits_processors": (lambda v: not v, "custom logits processors are not supported; SamplingParams has "
                                           "logit_bias, allowed_token_ids, bad_words and structured outputs"),
    "logprobs_mode": (lambda v: v in (None, "raw_logprobs"), "logprobs are the model's own ('raw_logprobs'), "
                                                             "before penalties, bias or temperature"),
    "model_impl": (lambda v: v in ("auto", "vllm"), "the models run as shardserve's own classes ('auto')"),
    "disable_sliding_window": (lambda v: not v, "sliding-window layers keep their windows"),
    "enable_expert_parallel": (lambda v: not v, "a mixture of experts is split by tensor parallelism"),
    "limit_mm_per_prompt": (lambda v: not v, "the models here take text"),
    "mm_processor_kwargs": (lambda v: not v, "the models here take text"),
}


@contextlib.contextmanager
def heap_out_of_collection():
    """While an offline call runs, what existed before it (torch's, transformers', the model's objects:
    ~300,000) is out of the garbage collector's sight, so the full collections that a call's many small
    objects set off scan only those: beam search spent a quarter of its time in them. Afterwards everything
    is collectable as before. A program that froze its heap itself is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class LLM(PoolingMixin):
    """Generation (`generate`, `chat`, `beam_search`) with runner="generate"; `embed`, `encode`,
    `classify`, `score`, `reward` (entrypoints/pooling.py) with runner="pooling"."""

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks_override: int | None = None,
                 device: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
                 hf_overrides: dict | None = None, skip_tokenizer_init: bool = False,
                 chat_template: str | None = None, enable_prompt_embeds: bool = False,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 distributed_executor_backend: str | None = None, address: str | None = None,
                 num_cpus_per_worker: float = 1.0, pp_layer_partition: list[int] | None = None,
                 placement_group_strategy: str = "PACK", runner: str = "auto", convert: str = "auto",
                 task: str | None = None, pooler_config: PoolerConfig | dict | str | None = None,
                 override_pooler_config: PoolerConfig | dict | str | None = None,
                 attention_backend: str | None = None, attention_config: dict | None = None,
                 enforce_eager: bool = False,
                 cuda_graph_sizes: list[int] | None = None, cudagraph_capture_sizes: list[int] | None = None,
                 max_cudagraph_capture_size: int | None = None, compilation_config: int | dict | None = None,
                 optimization_level: int | None = None, stream_interval: int = 1,
                 generation_config: str = "auto", override_generation_config: dict | None = None,
                 max_logprobs: int = 20, scheduling_policy: str = "fcfs",
                 structured_outputs_config: dict | None = None, reasoning_parser: str | None = None,
                 enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, async_scheduling: bool | None = None,
                 enable_chunked_prefill: bool | None = None, kv_cache_dtype: str = "auto",
                 quantization: str | None = None, tokenizer_mode: str = "auto", load_format: str = "auto",
                 worker_extension_cls: str | None = None, profiler_config: dict | None = None,
                 speculative_config: dict | None = None, **kwargs):
        unknown = set(kwargs) - set(_NEUTRAL_OPTIONS)
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}.")
        for name, value in kwargs.items():
            taken, instead = _NEUTRAL_OPTIONS[name]
            if not taken(value):
                raise ValueError(f"{name}={value!r} is not supported: {instead}.")
        self.chat_template = load_chat_template(chat_template)  # the default for chat(); a bad path fails here
        if pooler_config is not None and override_pooler_config is not None:
            raise ValueError("Pass pooler_config or its older name override_pooler_config, not both.")
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, num_gpu_blocks_override=num_gpu_blocks_override,
            device=device, trust_remote_code=trust_remote_code, revision=revision,
            hf_overrides=dict(hf_overrides or {}), skip_tokenizer_init=skip_tokenizer_init,
            enable_prompt_embeds=enable_prompt_embeds, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, distributed_executor_backend=distributed_executor_backend,
            ray_address=address, num_cpus_per_worker=num_cpus_per_worker, pp_layer_partition=pp_layer_partition,
            placement_group_strategy=placement_group_strategy, runner=runner, convert=convert, task=task,
            pooler_config=pooler_config if pooler_config is not None else override_pooler_config,
            attention_backend=attention_backend, attention_config=attention_config, enforce_eager=enforce_eager,
            cuda_graph_sizes=cuda_graph_sizes,
            cudagraph_capture_sizes=cudagraph_capture_sizes, max_cudagraph_capture_size=max_cudagraph_capture_size,
            compilation_config=compilation_config, optimization_level=optimization_level,
            stream_interval=stream_interval, generation_config=generation_config,
            override_generation_config=dict(override_generation_config or {}), max_logprobs=max_logprobs,
            scheduling_policy=scheduling_policy, structured_outputs_config=dict(structured_outputs_config or {}),
            reasoning_parser=reasoning_parser, enable_lora=enable_lora, max_loras=max_loras,
            max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras, async_scheduling=async_scheduling,
            enable_chunked_prefill=enable_chunked_prefill, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
            tokenizer_mode=tokenizer_mode, load_format=load_format, worker_extension_cls=worker_extension_cls,
            profiler_config=profiler_config, speculative_config=speculative_config)
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()
        self._enqueued: list[str] = []  # ids `enqueue` queued, in order, for `wait_for_completion`
        self._finished_early: dict[str, RequestOutput | PoolingRequestOutput] = {}  # of those, done by another call

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def shutdown(self) -> None:
        """Release the workers now rather than when this object is collected."""
        self.llm_engine.shutdown()

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Empty the prefix cache (vLLM's: after a weight update, or so a benchmark's runs start alike). vLLM's
        flags are taken and change nothing here: between offline calls no request runs (so none holds blocks to
        preempt), and there is no KV connector."""
        return self.llm_engine.reset_prefix_cache()

    def get_world_size(self, include_dp: bool = True) -> int:
        """Workers of this engine: tensor x pipeline parallel size (one replica: no data parallelism here)."""
        return self.llm_engine.config.world_size

    def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list:
        """Call `method` on every worker; their results in rank order (rank = stage x TP size + tensor rank).
        `method`: a worker method's name (`reload_weights`, `get_model`, ..., or one of `worker_extension_cls`),
        or a function called as `method(worker, *args, **kwargs)` (`worker.model`: that rank's shard). On Ray
        workers arguments and results travel pickled: send control and small data, not the model. After the
        call the workers pack again the CPU GEMM weights it changed; KV in the prefix cache is the old weights'
        (`reset_prefix_cache()`). An exception the method raised is raised here and the engine keeps serving;
        `timeout` (seconds, Ray workers) raises TimeoutError."""
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list:
        """`func(model)` on every worker's model shard; results in rank order (keep them small: on Ray they
        travel pickled). A `model.load_weights([(name, tensor), ...])` in it updates those weights in place."""
        return self.collective_rpc("apply_model", args=(func,))

    def start_profile(self, profile_prefix: str | None = None, *, delay_iterations: int | None = None,
                      max_iterations: int | None = None) -> None:
        """Record the workers' next steps with torch's profiler (`LLM(profiler_config={"profiler": "torch",
        "torch_profiler_dir": DIR})`): after `delay_iterations` steps, for at most `max_iterations` (0: until
        `stop_profile`); each worker writes a Chrome trace, `<profile_prefix>_pp<stage>_tp<rank>.*.pt.trace.json`,
        into DIR."""
        if not self.llm_engine.config.profiler_config.profiler:
            raise RuntimeError('Profiling is not enabled: LLM(profiler_config={"profiler": "torch", '
                               '"torch_profiler_dir": "<folder for the traces>"}).')
        self.collective_rpc("start_profile", args=(profile_prefix, delay_iterations, max_iterations))

    def stop_profile(self) -> None:
        """Stop recording; each worker writes its trace (one already stopped by max_iterations: nothing)."""
        if self.llm_engine.config.profiler_config.profiler:
            self.collective_rpc("stop_profile")

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's sleep mode (free the weights' and KV cache's device memory between calls) is not built here. On
        CPUs it is a no-op with a warning, as in vLLM's CPU backend; on a GPU it is refused, since a caller
        counting on the freed memory would run out of it."""
        if self.llm_engine.config.torch_device.type == "cuda":
            raise NotImplementedError("sleep mode is not supported on GPUs here: the engine keeps its weights and "
                                      "KV cache in device memory.")
        logger.warning("sleep mode is not supported on CPU, ignore it.")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """The other half of `sleep`: nothing to do."""

    def is_sleeping(self) -> bool:
        return False

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams: vLLM's defaults, with the model's
        generation config over them (`generation_config=`)."""
        return SamplingParams(**self.llm_engine.default_sampling_params)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, *,
                 priority: int | Sequence[int] | None = None,
                 tokenization_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """`lora_request`: the LoRA adapter (enable_lora=True) for all prompts, or one (or None) each.
        `priority`: one for all prompts or one each; lower is served first under scheduling_policy="priority"
        (any other policy takes only 0). `tokenization_kwargs`: `add_special_tokens`, `truncate_prompt_tokens`,
        `truncation_side` (engine.processor.TokenizationParams)."""
        requests = self._generation_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs)
        return self._run_requests(*requests, use_tqdm=use_tqdm)

    def enqueue(self, prompts: PromptType | Sequence[PromptType],
                sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                priority: int | Sequence[int] | None = None, use_tqdm: bool | Callable = True,
                tokenization_kwargs: dict[str, Any] | None = None) -> list[str]:
        """Queue prompts as `generate` would, without running them; returns their request ids.
        `wait_for_completion` runs everything queued and returns the outputs."""
        requests = self._generation_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs)
        ids = self._add_requests(*requests)
        self._enqueued.extend(ids)
        return ids

    def wait_for_completion(self, output_type: type | tuple[type, ...] | None = None, *,
                            use_tqdm: bool | Callable = True) -> list[RequestOutput | PoolingRequestOutput]:
        """Run the engine until every request `enqueue` queued is done; their outputs in the order they were
        queued (a queued request another call ran to its end meanwhile included)."""
        ids, self._enqueued = self._enqueued, []
        outputs = self._run_engine(ids, use_tqdm)
        if output_type is not None and not all(isinstance(o, output_type) for o in outputs):
            raise TypeError(f"wait_for_completion: not every output is a {output_type}.")
        return outputs

    def _generation_requests(self, prompts, sampling_params, lora_request, priority, tokenization_kwargs) -> tuple:
        """`generate`'s prompts checked and tokenized, one SamplingParams, priority and adapter each."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _one_each(sampling_params, len(prompts), "SamplingParams")
        priorities = _one_each(0 if priority is None else priority, len(prompts), "priorities")
        loras = _one_each(lora_request, len(prompts), "LoRA requests")
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        processor = self.llm_engine.processor
        tokenization = TokenizationParams(**tokenization_kwargs) if tokenization_kwargs else None
        processed = [processor.process_prompt(p, tokenization) for p in prompts]
        for p in params:
            processor.validate_params(p)
        for p in priorities:
            processor.check_priority(p)
        for lora in loras:
            processor.check_lora(lora)
        # Offline callers see only finished outputs: the engine need not build one per step.
        params = [p.clone(output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        return processed, params, priorities, loras

    def _add_requests(self, prompts: list, params: list[SamplingParams | PoolingParams],
                      priorities: list[int] | None = None, loras: list[LoRARequest | None] | None = None) -> list[str]:
        """Queue validated prompts in the engine; their ids. All or none: a failure takes back those queued."""
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(request_id, prompt, p, priority=priorities[i] if priorities else 0,
                                            lora_request=loras[i] if loras else None)
                ids.append(request_id)
        except BaseException:
            self.llm_engine.abort_request(ids)
            raise
        return ids

    def _run_requests(self, prompts: list, params: list[SamplingParams | PoolingParams],
                      priorities: list[int] | None = None, loras: list[LoRARequest | None] | None = None, *,
                      use_tqdm: bool | Callable = True) -> list[RequestOutput | PoolingRequestOutput]:
        """Queue validated prompts and run the engine until they finish; outputs in input order."""
        ids = self._add_requests(prompts, params, priorities, loras)
        try:
            return self._run_engine(ids, use_tqdm)
        except BaseException:
            self.llm_engine.abort_request(ids)
            raise

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             priority: int | Sequence[int] | None = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             tokenization_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a list of them,
        each rendered with the chat template (`chat_template`, else `LLM(chat_template=...)`, else the
        tokenizer's) and then generated as by `generate`. Arguments in vLLM's order;
        `chat_template_content_format`: "auto", "string" or "openai" (chat_utils.render_chat)."""
        self.llm_engine.processor.require_generation()
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer to render and tokenize the conversation; it is not "
                             "available with skip_tokenizer_init=True.")
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        template = chat_template if chat_template is not None else self.chat_template
        prompts = []
        for conversation in conversations:
            text = render_chat(tokenizer, conversation, template, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, tools=tools,
                               chat_template_kwargs=chat_template_kwargs,
                               content_format=chat_template_content_format)
            prompts.append(TextPrompt(prompt=text))
        # The template writes its own special tokens (BOS included): the tokenizer adds none unless asked.
        tokenization_kwargs = {"add_special_tokens": False, **(tokenization_kwargs or {})}
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                             priority=priority, tokenization_kwargs=tokenization_kwargs)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """Beam search for each prompt; all prompts' beams advance together, one batched step per token.
        `lora_request`: one adapter for all prompts, or one (or None) each. `concurrency_limit` (vLLM's): at most
        that many prompts' beams at once, the prompts taken in groups of that size (None: all at once)."""
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be a positive integer, got {concurrency_limit!r}.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        processor = self.llm_engine.processor
        processor.require_generation()
        processed = [processor.process_prompt(p) for p in prompts]
        if any(p.embeds is not None for p in processed):
            raise ValueError("beam_search takes text or token prompts, not prompt embeddings.")
        processor.validate_beam_width(params.beam_width)
        loras = _one_each(lora_request, len(processed), "LoRA requests")
        for lora in loras:
            processor.check_lora(lora)
        stepper = EngineBeamStepper(self.llm_engine)
        try:
            group = concurrency_limit or max(len(processed), 1)
            outputs = []
            with heap_out_of_collection():
                for start in range(0, len(processed), group):
                    outputs += run_beam_search(stepper, [p.token_ids for p in processed[start:start + group]],
                                               params, self.get_tokenizer(), self.llm_engine.max_model_len,
                                               use_tqdm, loras[start:start + group])
            return outputs
        finally:
            stepper.close()

    def _run_engine(self, request_ids: list[str],
                    use_tqdm: bool | Callable) -> list[RequestOutput | PoolingRequestOutput]:
        """Step the engine until nothing is left to run; the outputs of `request_ids` in that order. Requests
        `enqueue` queued finish too: theirs are kept for `wait_for_completion`."""
        engine = self.llm_engine
        wanted = set(request_ids)
        finished = {i: self._finished_early.pop(i) for i in request_ids if i in self._finished_early}
        progress = use_tqdm if callable(use_tqdm) else tqdm
        bar = progress(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        in_tokens = out_tokens = 0
        with bar, heap_out_of_collection():
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if output.request_id not in wanted:
                            continue
                        in_tokens += len(output.prompt_token_ids)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        speed = f"est. speed input: {in_tokens / elapsed:.2f} toks/s"
                        if isinstance(output, RequestOutput):  # pooling outputs have no output tokens
                            out_tokens += sum(len(c.token_ids) for c in output.outputs)
                            speed += f", output: {out_tokens / elapsed:.2f} toks/s"
                        bar.set_postfix_str(speed, refresh=False)
                        bar.update(1)
        for request_id in set(finished) - wanted:
            self._finished_early[request_id] = finished.pop(request_id)
        return [finished[i] for i in request_ids]


def _one_each(value, n: int, what: str) -> list:
    """`value` for each of `n` prompts: a list or tuple is one each (of length n), anything else is for all."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"Got {len(value)} {what} for {n} prompts; pass one, or one per prompt.")
    return list(value)
