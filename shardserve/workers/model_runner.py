"""Turns a `SchedulerOutput` into tensors, runs the model shard over the paged KV cache, and samples."""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from shardserve.distributed.parallel_state import get_pp_group, pp_recv, pp_send
from shardserve.engine.scheduler import PLACEHOLDER, NewRequestData, ScheduledRequest, SchedulerOutput
from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.attention.backend import PrefillSeq, host_to_device, to_device_aligned
from shardserve.layers.sampler import Sampler, SamplerOutput, SamplingBatch, compute_logprobs, seeded_draw
from shardserve.lora.adapter import AdapterCache
from shardserve.lora.layers import StackedLoRAs, active_loras, stack_loras, step_loras
from shardserve.lora.request import LoRARequest
from shardserve.sampling_params import SamplingParams
from shardserve.workers.block_table import BlockTables
from shardserve.workers.pooling_runner import prepare_pooling_step


# Queries up to this many tokens go through the paged decode path, one row per token.
PAGED_QUERY_MAX = 16


@dataclass
class LogprobsLists:
    """Per position: candidate token ids, their logprobs and ranks; entry 0 is the chosen/actual token."""
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[list[int]]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # Requests that verified drafts: the drafts the model agreed with, then its own next token (not in
    # sampled_token_ids)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)          # a position per new token
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)   # this step's prompt positions
    pooler_output: dict[str, torch.Tensor] = field(default_factory=dict)      # pooling models: CPU tensors


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device: `ModelRunner.collect` waits for its tokens.
    On a GPU the sampled ids (and logprobs) are already on their way to page-locked host memory; `done` is
    recorded after those copies."""
    result: ModelRunnerOutput
    scheduled: list[ScheduledRequest]
    sample_rows: list[int]              # indexes into `scheduled` of the requests that sample a token
    states: list[CachedRequestState]    # theirs, a row each (a request with k drafts has k + 1 rows)
    sampled: SamplerOutput | None       # on the host once `done` has happened
    done: torch.cuda.Event | None = None


@dataclass
class CachedRequestState:
    """What the worker remembers of a request between steps."""
    prompt_token_ids: list[int]
    token_ids: list[int]               # prompt + outputs known to this worker
    sampling_params: SamplingParams
    generator: torch.Generator | None
    prompt_embeds: torch.Tensor | None = None  # on the device, in the model dtype
    lora: LoRARequest | None = None
    # greedy, and nothing else about its sampling (no bias, penalties or logprobs): set from sampling_params
    plain_greedy: bool = field(init=False, default=False)
    # with a thinking budget: how far token_ids have been read for thinking tags, and where the open thinking
    # starts (the index after its start tag; None: not thinking)
    think_scanned: int = field(init=False, default=0)
    think_from: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        p = self.sampling_params
        self.plain_greedy = p.greedy and not p.has_penalties and p.logprobs is None and not (
            p.logit_bias or p.allowed_token_ids is not None or p.bad_words_token_ids or p.min_tokens
            or p.thinking_token_budget is not None)

    def forced_thinking_end(self) -> int | None:
        """With a thinking_token_budget: the end tag's id when the open thinking has used its budget (vLLM's
        rule: the tokens after the last start tag, in the prompt or the output, count), else None. Reads each
        token once over the request's life."""
        start, end = self.sampling_params.thinking_tags
        tokens = self.token_ids
        for i in range(self.think_scanned, len(tokens)):
            if tokens[i] == start:
                self.think_from = i + 1
            elif tokens[i] == end:
                self.think_from = None
        self.think_scanned = len(tokens)
        budget = self.sampling_params.thinking_token_budget
        return end if self.think_from is not None and len(tokens) - self.think_from >= budget else None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @functools.cached_property
    def prompt_token_set(self) -> frozenset[int]:
        """The prompt's distinct tokens, for the repetition penalty (none for an embeddings prompt)."""
        return frozenset() if self.prompt_embeds is not None else frozenset(self.prompt_token_ids)

    @property
    def needs_bias(self) -> bool:
        """Whether its logits get a bias row this step (logit bias, allowed or bad words, min_tokens)."""
        p = self.sampling_params
        return bool(p.logit_bias or p.allowed_token_ids is not None or p.bad_words_token_ids or (
            p.min_tokens and len(self.token_ids) - len(self.prompt_token_ids) < p.min_tokens))


class ModelRunner:
    def __init__(self, model, block_size: int, hf_config, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.vocab_size = hf_config.vocab_size
        self.hidden_size = hf_config.hidden_size
        self.dtype = dtype
        self.device = device
        self.pp = get_pp_group()
        self.sampler = Sampler(seed, device)
        self.requests: dict[str, CachedRequestState] = {}
        # the requests that ask for prompt logprobs, and those with prompt embeddings: most steps have neither,
        # and skip a pass over their requests
        self.prompt_logprob_ids: set[str] = set()
        self.prompt_embeds_ids: set[str] = set()
        self.block_tables = BlockTables()
        self.is_pooling = getattr(model, "pooling_kind", None) is not None
        self.graphs = None  # a CudaGraphRunner, set by the worker when decode steps replay CUDA graphs
        self.adapters: AdapterCache | None = None  # the loaded LoRA adapters, set by the worker (enable_lora)
        self._stacked_key: tuple[int, ...] | None = None   # the adapter ids of `_stacked`, the last stacked
        self._stacked: StackedLoRAs | None = None
        # On a GPU a step's sampled ids come back through page-locked memory, queued behind the step; `collect`
        # waits on an event recorded after the copy (inputs go the other way likewise: `host_to_device`).
        self.pin = device.type == "cuda"
        # The last step's sampled ids, still on the device, with that step's requests and which of them sampled:
        # a step launched before the engine has read them (async scheduling) takes its decode inputs from here.
        self._last_sampled: tuple[torch.Tensor, list[ScheduledRequest], list[int]] | None = None
        self._bit_index = torch.arange(32, dtype=torch.int32, device=device)  # unpacks structured-output bitmasks

    def to_device(self, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return host_to_device(values, self.device, dtype)

    # request state ----------------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
            self.prompt_logprob_ids.discard(request_id)
            self.prompt_embeds_ids.discard(request_id)
            self.block_tables.remove(request_id)
        for s in out.scheduled:
            if s.new_request is not None:
                self._add_request(s.new_request)
            state = self.requests[s.request_id]
            # A decode's input token is the one sampled last step: that is how outputs reach the worker.
            # (drafts are not the request's tokens unless the model agrees with them)
            start, end = s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids) - s.num_draft_tokens
            known = len(state.token_ids)
            if end > known:
                if start > known:
                    # drafts accepted in an earlier step, on a pipeline stage that does not sample and so never
                    # learnt them (it reads no tokens of its own: only the sampling stage does)
                    state.token_ids.extend([PLACEHOLDER] * (start - known))
                    known = start
                state.token_ids.extend(s.token_ids[known - start:end - start])

    def _add_request(self, new: NewRequestData) -> None:
        params = new.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            # After preemption the generator must resume where it was: replay the draws it made.
            for _ in new.output_token_ids:
                seeded_draw(generator)
        embeds = None if new.prompt_embeds is None else new.prompt_embeds.to(self.device)
        self.block_tables.add(new.request_id)
        if params.prompt_logprobs is not None:
            self.prompt_logprob_ids.add(new.request_id)
        if embeds is not None:
            self.prompt_embeds_ids.add(new.request_id)
        self.requests[new.request_id] = CachedRequestState(
            list(new.prompt_token_ids), list(new.prompt_token_ids) + list(new.output_token_ids), params,
            generator, embeds, new.lora_request)

    # inputs -----------------------------------------------------------------------------------------

    def _prepare(self, scheduled: list[ScheduledRequest]):
        """Flattened inputs. Short queries (decodes, small chunks, beams that differ in a few tokens) come
        first and become one row per query token for the backend's paged decode path, each row attending
        to its own prefix; longer queries get a prefill entry each. Everything goes to the device in one copy
        (at a few hundred requests a step, per-tensor copies and Python padding were a visible share of it);
        block tables come from the rows the worker keeps (`BlockTables`), brought up to date here."""
        bs, tables = self.block_size, self.block_tables
        row_of, table_lens = tables.row_of, tables.lens
        input_ids, positions, slots = [], [], []
        decode_lens, decode_rows, prefills = [], [], []
        fill_rows, fill_from = [], []  # input rows whose token is the last step's sample there, on the device
        last_rows = None               # request id -> its row in the last step's sample, at the first placeholder
        for s in scheduled:
            start, n = s.num_computed_tokens, len(s.token_ids)
            table, row = s.block_ids, row_of[s.request_id]
            if len(table) != table_lens[row]:
                tables.update(row, table)
            if n == 1:  # a decode: the common case, kept short
                if s.token_ids[0] == PLACEHOLDER:  # sampled by the step before, not yet read by the engine
                    if last_rows is None:
                        _, last_scheduled, last_sample_rows = self._last_sampled
                        last_rows = {last_scheduled[i].request_id: row for row, i in enumerate(last_sample_rows)}
                    fill_rows.append(len(input_ids))
                    fill_from.append(last_rows[s.request_id])
                input_ids.append(s.token_ids[0])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                decode_lens.append(start + 1)
                decode_rows.append(row)
                continue
            query_start = len(input_ids)
            input_ids.extend(s.token_ids)
            positions.extend(range(start, start + n))
            if n <= PAGED_QUERY_MAX:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                decode_lens.extend(range(start + 1, start + n + 1))
                decode_rows.extend([row] * n)
            else:  # (after every short query: the step's slots are the short ones', then each prefill's)
                prefills.append((query_start, n, start, tables.slots(row, bs, start + n)))
        num_decodes = len(decode_lens)
        width = max(map(table_lens.__getitem__, decode_rows), default=0)
        slots = np.concatenate([np.array(slots, np.int64), *(seq_slots[ctx:] for _, _, ctx, seq_slots in prefills)])
        input_ids, positions, slot_mapping, seq_lens, decode_tables, *kv_slots, fill_rows, fill_from = \
            to_device_aligned([input_ids, positions, slots, decode_lens, tables.table[decode_rows, :width].ravel(),
                               *(seq_slots for *_, seq_slots in prefills), fill_rows, fill_from], self.device)
        if len(fill_rows):
            input_ids[fill_rows] = self._last_sampled[0][fill_from]
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_size=bs, num_decode_tokens=num_decodes)
        if num_decodes:
            meta.decode_block_tables, meta.decode_seq_lens = decode_tables.view(num_decodes, width), seq_lens
        meta.prefills = [PrefillSeq(q0, n, ctx, slots) for (q0, n, ctx, _), slots in zip(prefills, kv_slots)]
        return input_ids, positions, meta

    def _inputs_embeds(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings with the rows of prompt-embeds requests replaced by their given embeddings, or
        None when no request in the step has any (the model then embeds the ids itself)."""
        if not self.prompt_embeds_ids:
            return None
        rows, start = [], 0
        for s in scheduled:
            embeds = self.requests[s.request_id].prompt_embeds
            end_in_prompt = min(s.num_computed_tokens + len(s.token_ids), 0 if embeds is None else len(embeds))
            if end_in_prompt > s.num_computed_tokens:
                rows.append((start, embeds[s.num_computed_tokens:end_in_prompt]))
            start += len(s.token_ids)
        if not rows:
            return None
        inputs_embeds = self.model.get_input_embeddings(input_ids)
        for offset, values in rows:
            inputs_embeds[offset:offset + len(values)] = values
        return inputs_embeds

    def _step_loras(self, scheduled: list[ScheduledRequest]) -> dict:
        """The step's adapted layers with their weights, for `active_loras` (empty: no adapter in the step)."""
        if self.adapters is None:
            return {}
        loras: dict[LoRARequest, int] = {}   # the step's adapters, by their index
        owners: list[int] = []               # each token row's adapter's index, -1 for none
        for s in scheduled:
            lora = self.requests[s.request_id].lora
            owners += [-1 if lora is None else loras.setdefault(lora, len(loras))] * len(s.token_ids)
        if not loras:
            return {}
        in_step = {lora.lora_int_id for lora in loras}
        weights = [self.adapters.get(lora, in_step) for lora in loras]
        if len(weights) == 1 and -1 not in owners:
            return weights[0]  # one adapter on every row: nothing to mask
        key = tuple(lora.lora_int_id for lora in loras)
        if key != self._stacked_key:  # decode steps keep their batch's adapters: stacked once for them all
            self._stacked_key, self._stacked = key, stack_loras(weights)
        return step_loras(self._stacked, self.to_device(owners, torch.int32))

    def _sampling_batch(self, states: list[CachedRequestState], grammar_rows: list[int | None] | None = None,
                        grammar_bits: torch.Tensor | None = None,
                        row_drafts: list[list[int]] | None = None) -> SamplingBatch:
        """The batch's sampling rules on the device. `grammar_rows[i]`: the row of `grammar_bits` (the step's
        structured-output bitmask) that constrains state i, or None. `row_drafts[i]`: the drafts before row i's
        position (speculative decoding), which the rules that read a request's output count as its tokens."""
        if grammar_rows is None and all(st.plain_greedy for st in states):  # the common case, in one pass
            return SamplingBatch(temperature=None, all_greedy=True)
        dev, V = self.device, self.vocab_size
        params = [st.sampling_params for st in states]
        all_greedy = all(p.greedy for p in params)
        temperature = None if all_greedy else \
            self.to_device([0.0 if p.greedy else p.temperature for p in params], torch.float32)
        b = SamplingBatch(temperature=temperature, all_greedy=all_greedy)
        if not b.all_greedy:
            if any(p.top_p < 1.0 for p in params):
                b.top_p = self.to_device([p.top_p for p in params], torch.float32)
            if any(p.top_k > 0 for p in params):
                b.top_k = self.to_device([p.top_k if p.top_k > 0 else V for p in params])
            if any(p.min_p > 0 for p in params):
                b.min_p = self.to_device([p.min_p for p in params], torch.float32)
            b.generators = {i: st.generator for i, st in enumerate(states) if st.generator is not None}
        if any(p.has_penalties for p in params):
            b.presence = self.to_device([p.presence_penalty for p in params], torch.float32)
            b.frequency = self.to_device([p.frequency_penalty for p in params], torch.float32)
            b.repetition = self.to_device([p.repetition_penalty for p in params], torch.float32)
            # The batch's penalised (row, token) pairs, each once, flattened on the host: one copy each.
            seen_rows, seen_tokens, out_rows, out_tokens, out_counts = [], [], [], [], []
            last_state, last_counts = None, None   # a request's rows are consecutive: its output counted once
            for i, st in enumerate(states):
                if st is not last_state:
                    last_state, last_counts = st, Counter(st.output_token_ids)
                counts = last_counts
                if row_drafts is not None and row_drafts[i]:
                    counts = counts.copy()
                    counts.update(row_drafts[i])
                out_rows += [i] * len(counts)
                out_tokens += counts.keys()
                out_counts += counts.values()
                seen = st.prompt_token_set.union(counts)
                seen_rows += [i] * len(seen)
                seen_tokens += seen
            b.seen = (self.to_device(seen_rows), self.to_device(seen_tokens))
            b.counted = (self.to_device(out_rows), self.to_device(out_tokens),
                         self.to_device(out_counts, torch.float32))
        # thinking whose budget is spent: the end tag is the one token left (a bias row only on those steps)
        forced_end = {i: end for i, st in enumerate(states) if st.sampling_params.thinking_token_budget is not None
                      and (end := st.forced_thinking_end()) is not None}
        needs_bias = [(i, st) for i, st in enumerate(states) if st.needs_bias or i in forced_end
                      or (grammar_rows is not None and grammar_rows[i] is not None)]
        if needs_bias:
            b.bias = torch.zeros(len(states), V, device=dev)
            for i, st in needs_bias:
                p = st.sampling_params
                output = st.output_token_ids + (row_drafts[i] if row_drafts is not None else [])
                for token_id, value in (p.logit_bias or {}).items():  # ids checked by the processor
                    b.bias[i, token_id] += value
                if len(output) < p.min_tokens:
                    banned = [t for t in p.all_stop_token_ids | set(p.stop_token_ids) if 0 <= t < V]
                    b.bias[i, banned] = float("-inf")
                if p.allowed_token_ids is not None:  # ids checked by the processor
                    allowed = self.to_device(p.allowed_token_ids)
                    row = torch.full((V,), float("-inf"), device=dev)
                    row[allowed] = b.bias[i, allowed]
                    b.bias[i] = row
                if p.bad_words_token_ids:
                    b.bias[i, _banned_by_bad_words(p.bad_words_token_ids, output)] = float("-inf")
                if i in forced_end:  # whatever else is asked
                    b.bias[i] = float("-inf")
                    b.bias[i, forced_end[i]] = 0.0
            if grammar_rows is not None:  # last: the structure is kept whatever the other rules ban
                rows = [(i, row) for i, row in enumerate(grammar_rows) if row is not None]
                batch_rows = self.to_device([i for i, _ in rows])
                words = grammar_bits[[row for _, row in rows]].to(dev)
                allowed = ((words.unsqueeze(-1) >> self._bit_index) & 1).bool().flatten(1)[:, :V]
                # a token the other rules ban stays possible, far below the rest (no host sync to check)
                b.bias[batch_rows] = torch.where(allowed, b.bias[batch_rows].clamp(min=-1e4), float("-inf"))
        b.max_num_logprobs = max((p.logprobs for p in params if p.logprobs is not None
                                  and p.logprob_token_ids is None), default=-1)
        if any(p.logprob_token_ids is not None for p in params):
            wanted = [p.logprob_token_ids or [] for p in params]
            width = max(len(w) for w in wanted)
            b.wanted_ids = self.to_device([t for w in wanted for t in w + [-1] * (width - len(w))]).view(-1, width)
        return b

    # step -------------------------------------------------------------------------------------------

    def _forward(self, input_ids, positions, meta, first_stage_inputs) -> torch.Tensor | None:
        """This stage's part of the model: the last stage returns the final hidden states, the others send
        theirs on and return None. `first_stage_inputs()` gives the extra inputs only the embedding stage
        reads (prompt embeddings, token types)."""
        if self.pp.is_first:
            hidden = self.model(input_ids, positions, meta, **first_stage_inputs())
        else:
            # A later pipeline stage starts from what the stage before it computed for the same tokens.
            received = pp_recv({key: torch.empty(len(input_ids), self.hidden_size, dtype=self.dtype,
                                                 device=self.device) for key in self.model.intermediate_keys})
            hidden = self.model(input_ids, positions, meta, intermediate=received)
        if not self.pp.is_last:
            pp_send(hidden)
            return None
        return hidden

    def execute_model(self, out: SchedulerOutput, non_block: bool = False) -> ModelRunnerOutput | LaunchedStep:
        """Run a step. `non_block`: return once its work is queued on the device (a `LaunchedStep`, for
        `collect`), so the engine can prepare the next step meanwhile (async scheduling)."""
        step = self.launch(out)
        if isinstance(step, ModelRunnerOutput):
            return step
        return step if non_block else self.collect(step)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> ModelRunnerOutput | LaunchedStep:
        if self.is_pooling:
            return self._execute_pooling(out)
        self._update_states(out)
        result = ModelRunnerOutput()
        if out.is_empty:
            return result
        scheduled = sorted(out.scheduled, key=lambda s: len(s.token_ids) > PAGED_QUERY_MAX)
        input_ids, positions, meta = self._prepare(scheduled)
        inputs_embeds = self._inputs_embeds(scheduled, input_ids) if self.pp.is_first else None
        loras = self._step_loras(scheduled)
        if self.graphs is not None and inputs_embeds is None and not loras and \
                self.graphs.can_run(len(input_ids), meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            with active_loras(loras):
                hidden = self._forward(input_ids, positions, meta, lambda: {"inputs_embeds": inputs_embeds})
        if hidden is None:
            return result

        # (one pass over the step's requests: at a few hundred a step each pass is a visible share of the host's)
        requests = self.requests
        offsets, sample_rows, states, last_tokens, total = [], [], [], [], 0
        row_drafts = None   # with drafts in the step: each sampled row's drafts before its position
        for i, s in enumerate(scheduled):
            offsets.append(total)
            total += len(s.token_ids)
            if s.sample:
                sample_rows.append(i)
                if s.num_draft_tokens:  # every position from the last token on is sampled, to verify the drafts
                    if row_drafts is None:
                        row_drafts = [[] for _ in states]
                    drafts = s.token_ids[-s.num_draft_tokens:]
                    row_drafts += (drafts[:j] for j in range(s.num_draft_tokens + 1))
                    states += [requests[s.request_id]] * (s.num_draft_tokens + 1)
                    last_tokens += range(total - s.num_draft_tokens - 1, total)
                    continue
                if row_drafts is not None:
                    row_drafts.append([])
                states.append(requests[s.request_id])
                last_tokens.append(total - 1)
        sampled = None
        if sample_rows:
            last = self.to_device(last_tokens)
            logits = self.model.compute_logits(hidden[last])
            grammar = out.grammar_bitmask
            grammar_rows = None if grammar is None else [grammar.rows.get(scheduled[i].request_id)
                                                         for i in sample_rows
                                                         for _ in range(scheduled[i].num_draft_tokens + 1)]
            sampled = self.sampler(logits, self._sampling_batch(states, grammar_rows,
                                                                None if grammar is None else grammar.bits, row_drafts))
            # (a request that drafts runs step by step: no step is launched before this one's tokens are read)
            self._last_sampled = None if row_drafts is not None else (sampled.token_ids, scheduled, sample_rows)
        for i, s in enumerate(scheduled if self.prompt_logprob_ids else ()):
            if s.request_id in self.prompt_logprob_ids:
                entry = self._prompt_logprobs(hidden, offsets[i], s, requests[s.request_id])
                if entry is not None:
                    result.prompt_logprobs[s.request_id] = entry
        step = LaunchedStep(result, scheduled, sample_rows, states, sampled)
        if sampled is not None and self.pin:  # start the copies to the host now; `collect` waits for them
            step.sampled = SamplerOutput(*(None if t is None else _to_host(t) for t in (
                sampled.token_ids, sampled.logprob_token_ids, sampled.logprobs, sampled.logprob_ranks)),
                wanted_start=sampled.wanted_start)
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """A launched step's output: its sampled tokens, as the engine reads them."""
        result, sampled = step.result, step.sampled
        if sampled is None:
            return result
        if step.done is not None:
            step.done.synchronize()
        token_ids = sampled.token_ids.tolist()
        lp = None
        if sampled.logprobs is not None:
            lp = (sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.logprob_ranks.tolist())
        row = 0
        for i in step.sample_rows:
            s = step.scheduled[i]
            state = step.states[row]
            if s.num_draft_tokens:
                num_new = self._verify_drafts(s, state, token_ids[row:row + s.num_draft_tokens + 1], result)
            else:
                token = result.sampled_token_ids[s.request_id] = token_ids[row]
                num_new = 1
                # The worker's copy of the sequence learns the token now (a step launched meanwhile holds a
                # placeholder in its place)
                position = s.num_computed_tokens + len(s.token_ids)
                if position < len(state.token_ids):
                    state.token_ids[position] = token
                else:
                    state.token_ids.append(token)
            k = state.sampling_params.logprobs
            if k is not None:
                if state.sampling_params.logprob_token_ids is None:  # the sampled token and the top k
                    columns = slice(0, k + 1)
                else:  # the sampled token and the wanted ones (k of them)
                    columns = [0, *range(sampled.wanted_start, sampled.wanted_start + k)]
                result.logprobs[s.request_id] = LogprobsLists(*([_pick(lp[x][r], columns)
                                                                 for r in range(row, row + num_new)]
                                                                for x in range(3)))
            row += 1 + s.num_draft_tokens
        return result

    @staticmethod
    def _verify_drafts(s: ScheduledRequest, state: CachedRequestState, targets: list[int],
                       result: ModelRunnerOutput) -> int:
        """The tokens a step with drafts yields, from `targets`, the model's token at each of its k + 1 positions
        (sampled as any step's): the drafts while they equal the model's, then the model's token where the first
        does not (or after the last draft). Returns how many."""
        k = s.num_draft_tokens
        drafts = s.token_ids[-k:]
        accepted = 0
        while accepted < k and targets[accepted] == drafts[accepted]:
            accepted += 1
        tokens = result.spec_token_ids[s.request_id] = targets[:accepted + 1]
        state.token_ids += tokens   # (it ends at the step's last token: drafts never join it unverified)
        return len(tokens)

    def _execute_pooling(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Prefill-only requests (pooling models): each prompt whole in this step, pooled on the last stage;
        the worker keeps nothing between steps."""
        result = ModelRunnerOutput()
        if out.is_empty:
            return result
        step = prepare_pooling_step(out.scheduled, self.device, self.model.is_causal)
        hidden = self._forward(step.input_ids, step.positions, step.meta, lambda: step.first_stage_inputs)
        if hidden is not None:
            result.pooler_output = step.pool(self.model.pooler, hidden)
        return result

    def _prompt_logprobs(self, hidden, offset: int, s: ScheduledRequest,
                         state: CachedRequestState) -> LogprobsLists | None:
        """Logprobs of the prompt tokens this chunk predicts: position p predicts prompt token p + 1."""
        prompt_len = len(state.prompt_token_ids)
        start = s.num_computed_tokens
        end = min(start + len(s.token_ids), prompt_len - 1)
        if end <= start:
            return None
        logprobs = self.model.compute_logits(hidden[offset:offset + end - start]).float().log_softmax(-1)
        targets = torch.tensor(state.prompt_token_ids[start + 1:end + 1], device=self.device)
        ids, values, ranks = compute_logprobs(logprobs, targets, state.sampling_params.prompt_logprobs)
        return LogprobsLists(ids.tolist(), values.tolist(), ranks.tolist())


def _pick(values: list, columns: slice | list[int]) -> list:
    return values[columns] if isinstance(columns, slice) else [values[c] for c in columns]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy into page-locked host memory, queued (not waited for)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _banned_by_bad_words(sequences: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """vLLM's rule: a bad word's last token is banned where the tokens generated so far end with the rest of the
    word (a one-token word is always banned)."""
    banned = []
    for ids in sequences:
        prefix = ids[:-1]
        if len(prefix) <= len(output_token_ids) and (
                not prefix or output_token_ids[len(output_token_ids) - len(prefix):] == prefix):
            banned.append(ids[-1])
    return banned
