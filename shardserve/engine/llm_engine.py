"""The engine loop: schedule a step, run it on the workers, fold the sampled tokens back into requests.

`add_request` / `abort_request` / `step` / `has_unfinished_requests` is the whole surface: the offline
`LLM` drives it in a loop, the async server from a background task.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardserve.config import EngineConfig, resolve_dtype
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.detokenizer import IncrementalDetokenizer, fast_decode, logprob_token_text
from shardserve.engine.generation_config import load_generation_config, sampling_defaults
from shardserve.engine.processor import ProcessedPrompt, Processor
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler, SchedulerOutput
from shardserve.engine.speculative import NgramProposer, SpecDecodeStats, can_draft
from shardserve.engine.structured_output import accept_token
from shardserve.executor import create_executor
from shardserve.inputs import PromptType
from shardserve.lora.request import LoRARequest
from shardserve.layers.linear import check_tensor_parallel_sizes
from shardserve.models.pipeline import split_layers
from shardserve.models.pooling import resolve_pooling_model
from shardserve.models.source import load_model_source, load_tokenizer
from shardserve.outputs import (CompletionOutput, Logprob, PoolingOutput, PoolingRequestOutput, PositionLogprobs,
                                RequestOutput)
from shardserve.pooling_params import PoolingParams
from shardserve.sampling_params import RequestOutputKind, SamplingParams
from shardserve.workers.model_runner import LogprobsLists, ModelRunnerOutput

logger = logging.getLogger(__name__)


@dataclass
class _Parent:
    """The caller's view of a request: its n completions (child requests) gathered into one output."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: dict[str, IncrementalDetokenizer]
    # New tokens per streamed output (0: the final output only)
    stream_interval: int = 1
    delta: bool = False  # DELTA outputs: only what is new (prompt logprobs in the first)
    # Kept for DELTA outputs and stream intervals above 1: what each completion's last output carried (tokens,
    # characters, whether it had finished)
    sent: dict[str, tuple[int, int, bool]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        for child in self.children:  # (a loop, not all() over a generator: read for every output of every step)
            if not child.status.finished:
                return False
        return True


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = load_model_source(config.model, config.hf_overrides, config.revision,
                                        config.trust_remote_code)
        hf_config = self.source.hf_config
        # What the model runs as (generation, or which kind of pooling) is settled once, here; an
        # unsupported architecture fails before anything is loaded.
        self.source.pooling = pooling = resolve_pooling_model(self.source, config.runner, config.convert,
                                                              config.task, config.pooler_config)
        self.runner = "generate" if pooling is None else "pooling"
        if pooling is not None and config.speculative_config is not None:
            raise ValueError("speculative_config applies to generation: this model runs as a pooling model, whose "
                             "requests are one step each.")
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(
            self.source, config.tokenizer, config.revision, config.trust_remote_code)
        self.decode = None if self.tokenizer is None else fast_decode(self.tokenizer)
        self.max_model_len = self._resolve_max_model_len(hf_config)
        max_batched = config.max_num_batched_tokens or max(self.max_model_len, 2048)
        if pooling is not None and max_batched < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={max_batched} is below max_model_len={self.max_model_len}: "
                             f"a pooling model computes each prompt whole in one step, so the step budget must "
                             f"hold the longest prompt.")
        if config.enable_chunked_prefill is False and max_batched < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={max_batched} is below max_model_len={self.max_model_len}: "
                             f"without chunked prefill each prompt is computed whole in one step, so the step "
                             f"budget must hold the longest prompt (or enable chunked prefill).")
        dtype = resolve_dtype(config.dtype, hf_config, config.torch_device)
        self._check_checkpoint_options(config, dtype)

        # Workers size their CUDA graphs and their memory profile from these: give them the resolved values.
        self.config = config = dataclasses.replace(config, max_model_len=self.max_model_len,
                                                   max_num_batched_tokens=max_batched)

        # A model that cannot be split as asked fails here, not inside a worker actor.
        check_tensor_parallel_sizes(hf_config, config.tensor_parallel_size)
        split_layers(hf_config.num_hidden_layers, config.pipeline_parallel_size, config.pp_layer_partition)
        self.executor = create_executor(config, self.source)
        try:
            num_blocks = self._init_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler = Scheduler(BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
                                   config.max_num_seqs, max_batched, config.scheduling_policy,
                                   config.max_loras if config.enable_lora else 0, self.max_model_len,
                                   chunked_prefill=config.enable_chunked_prefill is not False,
                                   proposer=None if config.speculative_config is None
                                   else NgramProposer(config.speculative_config))
        self.spec_decode_stats = SpecDecodeStats()   # drafts proposed and accepted (speculative decoding)
        generation_config = load_generation_config(self.source.path, config.revision)
        # What a request leaves out of its sampling parameters, from the model's generation config (vLLM's rule).
        self.default_sampling_params = sampling_defaults(generation_config, config.generation_config,
                                                         config.override_generation_config)
        if self.default_sampling_params and config.generation_config != "vllm":
            logger.warning("Sampling defaults from %s: %s (generation_config='vllm' leaves vLLM's own)",
                           "the model's generation_config.json" if config.generation_config == "auto"
                           else config.generation_config, self.default_sampling_params)
        self.processor = Processor(
            self.tokenizer, hf_config.vocab_size, self.max_model_len,
            self._eos_token_ids(hf_config, generation_config),
            # what get_input_embeddings yields: OPT's can be narrower than its hidden size
            embed_dim=getattr(hf_config, "word_embed_proj_dim", None) or hf_config.hidden_size,
            dtype=dtype, enable_prompt_embeds=config.enable_prompt_embeds, pooling=pooling,
            model_name=config.served_model_name or config.model,
            hf_config=hf_config, max_logprobs=config.max_logprobs, scheduling_policy=config.scheduling_policy,
            compact_json=bool(config.structured_outputs_config.get("disable_any_whitespace", False)),
            reasoning_parser=None if config.structured_outputs_config.get("enable_in_reasoning") else
            config.reasoning_parser, max_lora_rank=config.max_lora_rank if config.enable_lora else None)
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, _Parent] = {}
        # Async scheduling (EngineConfig.async_scheduling): where the executor can leave a step in flight, by
        # default on a GPU; pooling steps have nothing to overlap.
        self.async_scheduling = self.executor.supports_launch and pooling is None and (
            config.async_scheduling if config.async_scheduling is not None else config.torch_device.type == "cuda")
        self._in_flight: tuple[SchedulerOutput, Callable[[], ModelRunnerOutput]] | None = None

    def _check_checkpoint_options(self, config: EngineConfig, dtype: torch.dtype) -> None:
        """vLLM's kv_cache_dtype and quantization against what this checkpoint runs as, in `dtype` (EngineConfig
        has the rest)."""
        if config.kv_cache_dtype != "auto" and resolve_dtype(config.kv_cache_dtype, None, config.torch_device) != dtype:
            raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype!r} is not supported: the KV cache is kept in the "
                             f"model's dtype ({str(dtype).removeprefix('torch.')}).")
        if config.quantization == "gguf" and not self.source.is_gguf:
            raise ValueError(f"quantization 'gguf' needs a GGUF file; {config.model!r} is not one.")

    def _resolve_max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
        default = limit
        if self.source.pooling is not None:
            limit, default = self.source.pooling.max_model_len(limit)
        if self.config.max_model_len is None:
            return default or 2048
        if limit and self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}.")
        return self.config.max_model_len

    def _eos_token_ids(self, hf_config, generation_config: dict) -> set[int]:
        ids = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if generation_config:
            eos = generation_config.get("eos_token_id")
        else:
            eos = getattr(hf_config, "eos_token_id", None) if not ids else None
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
        return ids

    # requests ---------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                    params: SamplingParams | PoolingParams | None = None, hold_kv: bool = False,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queue a prompt: with SamplingParams to generate, with PoolingParams for a pooling model.
        `hold_kv`: keep the finished request's KV blocks for `fork_request` until `release_requests`.
        `priority`: under scheduling_policy="priority", lower is served first. `lora_request`: the LoRA
        adapter to run it through (enable_lora)."""
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        children = self.processor.make_requests(request_id, prompt, params or SamplingParams(), priority,
                                                lora_request=lora_request)
        for child in children:
            child.hold_kv = hold_kv
        self.add_processed_request(request_id, children)

    def fork_request(self, request_id: str, parent_request_id: str, token_id: int, params: SamplingParams) -> None:
        """Queue the tokens a finished `hold_kv` request computed, plus `token_id`, reusing that request's KV
        blocks (beam search's extensions): only the new token is computed. The new request holds its KV too, and
        has the parent's priority and adapter."""
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        parent = self.scheduler.held.get(parent_request_id)
        if parent is None:
            raise ValueError(f"Request {parent_request_id!r} holds no KV blocks to fork from.")
        (token_id,) = self.processor.validate_token_ids([token_id])
        tokens = parent.all_token_ids[:parent.num_computed_tokens] + [token_id]
        child = Request(request_id, tokens, params, hold_kv=True, priority=parent.priority,
                        lora_request=parent.lora_request)
        self.scheduler.prepare_fork(parent_request_id, child)
        self.add_processed_request(request_id, [child])

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while a request holds KV blocks."""
        if self.scheduler.block_manager.reset_prefix_cache():
            return True
        logger.warning("The prefix cache was not reset: requests still hold KV blocks.")
        return False

    def release_requests(self, request_ids: list[str]) -> None:
        """Free the KV blocks finished `hold_kv` requests kept."""
        for request_id in request_ids:
            self.scheduler.release(request_id)

    def add_processed_request(self, request_id: str, children: list[Request]) -> None:
        """Queue requests the processor already made (the async engine validates on its caller's thread)."""
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        first = children[0]
        if first.pooling_params is not None:
            self.parents[request_id] = _Parent(request_id, first.prompt, first.prompt_token_ids, children, {})
            self.child_to_parent[request_id] = self.parents[request_id]
            self.scheduler.add_request(first)
            return
        for child in children:
            # Sampling that reads the request's own output tokens needs them on the host before its next step;
            # beams fork from finished requests; prompt logprobs are read back within the step; drafts are
            # proposed from the tokens the step before accepted.
            p = child.sampling_params
            child.can_draft = self.scheduler.proposer is not None and can_draft(child)
            child.steps_alone = child.hold_kv or child.grammar is not None or p.has_penalties or \
                bool(p.bad_words_token_ids) or p.prompt_logprobs is not None or \
                p.thinking_token_budget is not None or child.can_draft
        # An embeddings prompt has no real token ids to report or to detokenize against.
        prompt_ids = [] if first.prompt_embeds is not None else first.prompt_token_ids
        params = first.sampling_params
        parent = _Parent(request_id, first.prompt, prompt_ids, children,
                         {c.request_id: IncrementalDetokenizer(self.tokenizer, prompt_ids, c.sampling_params,
                                                                 self.decode)
                          for c in children},
                         stream_interval=0 if params.output_kind == RequestOutputKind.FINAL_ONLY
                         else max(self.config.stream_interval, params.stream_interval or 1),
                         delta=params.output_kind == RequestOutputKind.DELTA)
        self.parents[request_id] = parent
        for child in children:
            self.child_to_parent[child.request_id] = parent
            self.scheduler.add_request(child)

    def _init_kv_cache(self) -> int:
        config = self.config
        if self.source.pooling is not None:
            self.executor.init_kv_cache(0)  # prefill-only requests keep no KV cache
            return 0
        num_blocks = self.executor.determine_num_blocks()
        if config.num_gpu_blocks_override is None:
            # More blocks than every sequence at full length can use would only cost memory to zero.
            num_blocks = min(num_blocks, config.max_num_seqs * -(-self.max_model_len // config.block_size))
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"The KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of "
                f"{config.block_size}), fewer than max_model_len={self.max_model_len}; give it more memory "
                f"or lower max_model_len.")
        self.executor.init_kv_cache(num_blocks)
        tokens = num_blocks * config.block_size
        logger.info("KV cache: %d blocks of %d tokens (%d tokens): %.1f requests of max_model_len=%d at once",
                    num_blocks, config.block_size, tokens, tokens / self.max_model_len, self.max_model_len)
        return num_blocks

    def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        """A caller's call on every worker between steps (`Executor.call_workers`); results in rank order."""
        return self.executor.call_workers(method, tuple(args), kwargs, timeout)

    def shutdown(self) -> None:
        """Release the workers (and on Ray their actors, placement group and process groups)."""
        self.executor.shutdown()

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.pop(request_id, None)
            if parent is None:
                continue
            for child in parent.children:
                self.child_to_parent.pop(child.request_id, None)
                if not child.is_finished:
                    self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # the step ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the current output of every request that progressed. With async
        scheduling the step scheduled here is left in flight on the device, and what it returns is the output
        of the step before, read meanwhile."""
        overlap = self.async_scheduling and not any(r.steps_alone for r in self.scheduler.requests.values())
        if self._in_flight is not None and not overlap:
            return self._finish_in_flight()  # a request that runs step by step joined: the last overlapped one
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if sched.finished_request_ids:
                self.executor.execute_model(sched)  # only tells the workers which requests ended
            if self._in_flight is not None:  # what waits on it (a last token, blocks) is read now
                return self._finish_in_flight()
            if self.scheduler.has_unfinished_requests():
                raise RuntimeError("The scheduler could not schedule any request: the KV cache is too small "
                                   "for the waiting requests.")
            return []
        constrained = [req for s in sched.scheduled if s.sample and
                       (req := self.scheduler.requests[s.request_id]).grammar is not None and req.reasoning_ended]
        if constrained:
            sched.grammar_bitmask = self.processor.structured.bitmask(constrained)
        if not overlap:
            return self._process(sched, self.executor.execute_model(sched))
        previous, self._in_flight = self._in_flight, (sched, self.executor.launch_model(sched))
        return [] if previous is None else self._process(previous[0], previous[1]())

    def _finish_in_flight(self) -> list[RequestOutput]:
        sched, wait = self._in_flight
        self._in_flight = None
        return self._process(sched, wait())

    def _process(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        """The engine's side of a step: append tokens, check stops, and the outputs of what progressed."""
        touched: dict[str, _Parent] = {}
        requests, parents = self.scheduler.requests, self.child_to_parent
        sampled, prompt_logprobs, spec = result.sampled_token_ids, result.prompt_logprobs, result.spec_token_ids
        for s in sched.scheduled:
            req = requests.get(s.request_id)
            parent = parents.get(s.request_id)
            if req is None or parent is None:
                continue
            if req.pooling_params is not None:  # computed whole in this step: done
                req.pooled = result.pooler_output[s.request_id]
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                touched[parent.request_id] = parent
                continue
            if prompt_logprobs and s.request_id in prompt_logprobs:
                start = len(req.prompt_logprobs)  # the prompt position of the first new entry
                req.prompt_logprobs.extend(self._to_logprobs(prompt_logprobs[s.request_id],
                                                             req.prompt_token_ids, start))
            if s.sample and req.num_output_placeholders:
                req.num_output_placeholders -= 1
            if s.num_draft_tokens:
                self._append_verified(req, parent, s.num_draft_tokens, spec[s.request_id],
                                      result.logprobs.get(s.request_id))
            elif (token_id := sampled.get(s.request_id)) is not None:
                self._append_token(req, parent, token_id, result.logprobs.get(s.request_id) if result.logprobs
                                   else None)
            else:
                continue
            if (req.is_finished and parent.finished) or (parent.stream_interval and self._stream_due(parent, req)):
                touched[parent.request_id] = parent
        if not self.scheduler.has_unfinished_requests():
            self._go_idle()
        outputs = []
        for parent in touched.values():
            output = self._make_output(parent)
            outputs.append(output)
            if output.finished:
                self.parents.pop(parent.request_id, None)
                for child in parent.children:
                    self.child_to_parent.pop(child.request_id, None)
        return outputs

    def _go_idle(self) -> None:
        """Nothing left to run: wait out a step still in flight (its tokens are those of requests that have
        ended since it was launched) and tell the workers now which requests ended, rather than with a step
        that may never come."""
        if self._in_flight is not None:
            self._in_flight[1]()
            self._in_flight = None
        sched = self.scheduler.schedule()
        if sched.finished_request_ids:
            self.executor.execute_model(sched)

    @staticmethod
    def _stream_due(parent: _Parent, req: Request) -> bool:
        """Whether a streamed completion reports this step: every `stream_interval` new tokens (the engine's, or
        the request's when larger), and at once for its first token and when it finishes (vLLM's rule)."""
        if parent.stream_interval <= 1:
            return parent.stream_interval == 1
        streamed = parent.sent.get(req.request_id, (0,))[0]
        return streamed == 0 or req.is_finished or req.num_output_tokens - streamed >= parent.stream_interval

    def _append_token(self, req: Request, parent: _Parent, token_id: int, logprobs: LogprobsLists | None) -> None:
        req.append_token(token_id)
        num_output = len(req.output_token_ids)
        if logprobs is not None:
            entry = self._to_logprobs(logprobs, req.output_token_ids, num_output - 1,
                                      req.sampling_params.detokenize)[0]
            req.logprobs.append(entry)
            req.cumulative_logprob += entry[token_id].logprob
        params = req.sampling_params
        stop_token = num_output >= params.min_tokens and (
            token_id in params.all_stop_token_ids or token_id in params.stop_token_ids)
        stop_str = None
        # As vLLM: a stop token's own text is left out (unless include_stop_str_in_output), and stop strings only
        # count once more than min_tokens tokens exist.
        if not stop_token or params.include_stop_str_in_output:
            stop_str = parent.detokenizers[req.request_id].append(token_id, check_stop=num_output > params.min_tokens)
        status = None
        if req.grammar is not None and not self._advance_grammar(req, token_id):
            status = RequestStatus.FINISHED_ABORTED
        elif stop_str is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        elif stop_token:
            status = RequestStatus.FINISHED_STOPPED
            # EOS is the natural end (no stop_reason); a user's stop token is reported.
            req.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif len(req.all_token_ids) >= req.max_len:  # max_tokens, or max_model_len
            status = RequestStatus.FINISHED_LENGTH
        elif params.repetition_detection is not None and params.repetition_detection.repeats(req.output_token_ids):
            status, req.stop_reason = RequestStatus.FINISHED_REPETITION, "repetition_detected"
        if status is not None:
            self.scheduler.finish(req, status)

    def _append_verified(self, req: Request, parent: _Parent, num_drafts: int, tokens: list[int],
                         logprobs: LogprobsLists | None) -> None:
        """A step that verified `num_drafts` drafts: the rejected ones' KV is given back (their slots are
        computed again with the tokens that replace them), and the accepted ones and the model's next token are
        appended in order, up to whichever ends the request."""
        req.num_computed_tokens -= num_drafts - (len(tokens) - 1)
        self.spec_decode_stats.add(num_drafts, len(tokens) - 1)
        for j, token_id in enumerate(tokens):
            self._append_token(req, parent, token_id, None if logprobs is None else LogprobsLists(
                logprobs.token_ids[j:j + 1], logprobs.logprobs[j:j + 1], logprobs.ranks[j:j + 1]))
            if req.is_finished:
                break

    def _advance_grammar(self, req: Request, token_id: int) -> bool:
        """Walk a constrained request's grammar by its new token; False if the grammar refuses it. While a
        reasoning model thinks, the grammar waits: it starts after the token that ends the thinking (or at it,
        where that token is part of the answer, as Qwen3's `<tool_call>`)."""
        if not req.reasoning_ended:
            start = self.processor.reasoner.grammar_start(token_id)
            if start is None:
                return True
            req.reasoning_ended = True
            if start == 1:
                return True
        return accept_token(req, token_id)

    def _to_logprobs(self, lists: LogprobsLists, tokens: list[int], start: int,
                     detokenize: bool = True) -> list[PositionLogprobs]:
        """Entries for positions `start`, `start + 1`, ... of `tokens` (the prompt's, or the output's): the
        tokens before each position are the context its tokens are read in (`logprob_token_text`)."""
        entries = []
        for i, (ids, values, ranks) in enumerate(zip(lists.token_ids, lists.logprobs, lists.ranks)):
            entry = {}
            for token_id, value, rank in zip(ids, values, ranks):
                if token_id not in entry:
                    decoded = logprob_token_text(self.tokenizer, token_id, tokens[max(0, start + i - 4):start + i]) \
                        if self.tokenizer is not None and detokenize else None
                    entry[token_id] = Logprob(value, rank, decoded)
            entries.append(entry)
        return entries

    def _make_output(self, parent: _Parent) -> RequestOutput | PoolingRequestOutput:
        if parent.children[0].pooled is not None:
            return PoolingRequestOutput(parent.request_id, PoolingOutput(parent.children[0].pooled),
                                        parent.prompt_token_ids, finished=True)
        completions = []
        first_output = not parent.sent
        for child in parent.children:
            params = child.sampling_params
            finished = child.is_finished
            text = parent.detokenizers[child.request_id].text_to_report(finished)
            token_ids, logprobs = child.output_token_ids, child.logprobs
            if parent.delta or parent.stream_interval > 1:
                last = parent.sent.get(child.request_id, (0, 0, False))
                parent.sent[child.request_id] = (len(token_ids), len(text), finished)
            if parent.delta:  # only what is new: completions with nothing new are left out
                num_tokens, num_chars, _ = last
                if last == parent.sent[child.request_id]:
                    continue
                text, token_ids = text[num_chars:], token_ids[num_tokens:]
                logprobs = None if logprobs is None else logprobs[num_tokens:]
            else:
                token_ids = list(token_ids)
            completions.append(CompletionOutput(
                index=child.index, text=text, token_ids=token_ids,
                cumulative_logprob=child.cumulative_logprob if params.logprobs is not None else None,
                logprobs=logprobs, finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        first = parent.children[0]
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids,
                             prompt_logprobs=first.prompt_logprobs if first_output or not parent.delta else None,
                             outputs=completions, finished=parent.finished,
                             num_cached_tokens=first.num_cached_tokens)

    def get_tokenizer(self):
        return self.tokenizer
