"""Continuous batching under one token budget.

Each step hands out token counts: running requests first (a decode wants one token, an unfinished
prefill the rest of its prompt), then waiting requests, all within `max_num_batched_tokens` and
`max_num_seqs`. A prompt that does not fit the budget is chunked (or, with chunked prefill off, waits for a
step with room for all of it). When KV blocks run out, the last running
request is preempted: its blocks are freed and it recomputes later.

With LoRA, at most `max_loras` adapters run at once (vLLM's rule): a waiting request of another adapter stays
in its place while the requests behind it are admitted.

The policy orders both queues. "fcfs": arrival order, and running in admission order, so the victim is the
most recently admitted request, and a preempted request waits at the head of the queue. "priority" (vLLM's
`--scheduling-policy priority`): both queues sorted by (priority, arrival), lower first, so the waiting
request admitted next is the most urgent, running requests take the step's budget most urgent first, and
the victim is the least urgent running request; a preempted request waits in its place by priority. The
victim is always one not yet scheduled this step (it sorts after every request before it), so no step
ever takes back work it handed out.

With async scheduling the engine schedules a step before it has read the tokens of the step in flight: a
decode then computes a placeholder (`PLACEHOLDER`), the token that step samples, which the worker takes from
the device. A request whose last token is being sampled (max_tokens, max_model_len) waits instead, and one
preempted with a token in flight is not readmitted until the engine has read it.

With speculative decoding (engine/speculative.py), a decoding request that may take drafts gets up to k of
them after its last token, within the budget and short of its length limit, if its blocks have room for them
(else it decodes one token, before anything is preempted for it). `num_computed_tokens` then counts the drafts;
the engine takes back the ones the model rejected once it has read the step.

A finished request marked `hold_kv` keeps its blocks until released: beam search forks each extension
from it (`prepare_fork`), sharing its full blocks and copying a partial last block, and the copy travels to
the workers with the next step (`blocks_to_copy`), before any attention reads or writes.

Pooling requests are prefill-only: a prompt is scheduled whole or waits for a later step (an encoder's
bidirectional attention cannot be split into chunks; the engine keeps the budget at least max_model_len),
takes no KV blocks (attention runs over the step's own tokens and nothing reads them afterwards), and is
finished by the engine after the step that computes it, so it never joins `running`.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch

from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.speculative import NgramProposer
from shardserve.engine.structured_output import GrammarBitmask
from shardserve.lora.request import LoRARequest
from shardserve.pooling_params import PoolingParams
from shardserve.sampling_params import SamplingParams


# In a scheduled request's token_ids: the token sampled by the step in flight, which the engine has not read.
PLACEHOLDER = -1


@dataclass
class NewRequestData:
    """What a worker needs to know about a request the first time it sees it (or after preemption)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams | None
    prompt_embeds: torch.Tensor | None = None  # replaces the prompt tokens' embeddings
    pooling_params: PoolingParams | None = None
    token_type_ids: list[int] | None = None
    lora_request: LoRARequest | None = None    # the adapter its tokens run through


@dataclass(slots=True)  # a few hundred made every step
class ScheduledRequest:
    request_id: str
    token_ids: list[int]           # the tokens whose KV this step computes
    num_computed_tokens: int       # position of token_ids[0] in the sequence
    block_ids: list[int]           # the request's whole block table
    sample: bool                   # the step reaches the sequence's end, so a token is sampled
    new_request: NewRequestData | None = None
    num_draft_tokens: int = 0      # the last ones of token_ids are drafts (speculative decoding) to verify


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # workers drop their state for these
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) KV blocks
    grammar_bitmask: GrammarBitmask | None = None  # the tokens constrained requests may sample (the engine's)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _urgency(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", max_loras: int = 0, max_model_len: int | None = None,
                 chunked_prefill: bool = True, proposer: NgramProposer | None = None):
        self.block_manager = block_manager
        self.proposer = proposer  # speculative decoding: proposes drafts for requests that can take them
        self.chunked_prefill = chunked_prefill  # False: a prompt is admitted only with room for all of it
        self.max_model_len = max_model_len
        self.max_loras = max_loras   # (enable_lora) the adapters running at once at most; 0: no limit
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.by_priority = policy == "priority"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.held: dict[str, Request] = {}           # finished, KV blocks kept for forks
        self._partial_taken: set[str] = set()         # held requests whose partial last block a fork took
        self._pending_copies: list[tuple[int, int]] = []

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if request.sampling_params is not None:
            lengths = [self.max_model_len, request.sampling_params.max_tokens and
                       request.num_prompt_tokens + request.sampling_params.max_tokens]
            request.max_len = min((n for n in lengths if n), default=1 << 62)
        self._enqueue(self.waiting, request)

    def _enqueue(self, queue: deque[Request] | list[Request], req: Request, front: bool = False) -> None:
        """Put `req` into `queue` in the policy's order: by urgency, else at the back (or `front`)."""
        if self.by_priority:
            bisect.insort(queue, req, key=_urgency)
        elif front:
            queue.appendleft(req)
        else:
            queue.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        preempted = False

        # (names bound once: this loop runs for every running request every step)
        running, allocate, schedule, scheduled = self.running, self.block_manager.allocate_slots, self._schedule, \
            out.scheduled
        max_drafts = self.proposer.max_drafts(len(running)) if self.proposer is not None else 0
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            in_flight = req.num_output_placeholders
            if in_flight and len(req.all_token_ids) + in_flight >= req.max_len:  # its last token is in flight
                i += 1
                continue
            num_new = min(len(req.all_token_ids) + in_flight - req.num_computed_tokens, budget)
            if req.can_draft and num_new == 1 and budget > 1 and max_drafts and not in_flight:
                drafts = self.proposer.propose(req, min(budget - 1, max_drafts,
                                                        req.max_len - len(req.all_token_ids) - 1))
                if drafts and allocate(req, 1 + len(drafts)):
                    scheduled.append(schedule(req, 1, False, drafts))
                    budget -= 1 + len(drafts)
                    i += 1
                    continue
            while not allocate(req, num_new):
                victim = running.pop()  # the least urgent (the policy's order): not yet scheduled
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append(schedule(req, num_new, False))
                budget -= num_new
                i += 1

        # Admit waiting requests only if nothing had to make room this step.
        num_pooling, j = 0, 0
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request} if self.max_loras else set()
        while j < len(self.waiting) and budget > 0 and len(self.running) + num_pooling < self.max_num_seqs and \
                not preempted:
            req = self.waiting[j]
            if req.num_output_placeholders:  # preempted with a token in flight: readmitted once it is read
                j += 1
                continue
            if self.max_loras and req.lora_request and req.lora_request.lora_int_id not in adapters and \
                    len(adapters) >= self.max_loras:
                j += 1   # (vLLM's rule) its adapter waits for one of the running ones to finish; others go on
                continue
            if req.pooling_params is not None:
                if req.num_tokens > budget:
                    break
                del self.waiting[j]
                req.status = RequestStatus.RUNNING
                out.scheduled.append(self._schedule(req, req.num_tokens, new=True))
                budget -= req.num_tokens
                num_pooling += 1
                continue
            cached = self.block_manager.find_cached_blocks(req) if req.num_computed_tokens == 0 else []
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_left = req.num_tokens - req.num_computed_tokens - num_cached_tokens
            num_new = min(num_left, budget)
            if num_new < num_left and not self.chunked_prefill:
                break  # waits, in its place, for a step with room for its whole prompt
            if not self.block_manager.allocate_slots(req, num_new, cached):
                if self._make_room(req, stuck=not out.scheduled):
                    continue  # blocks came free: try again
                break
            del self.waiting[j]
            if req.lora_request and self.max_loras:
                adapters.add(req.lora_request.lora_int_id)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached_tokens
            req.num_computed_tokens += num_cached_tokens
            req.status = RequestStatus.RUNNING
            self._enqueue(self.running, req)
            out.scheduled.append(self._schedule(req, num_new, new=True))
            budget -= num_new
        if out.scheduled and self._pending_copies:  # before the forward that first reads the copies
            out.blocks_to_copy, self._pending_copies = self._pending_copies, []
        return out

    def _make_room(self, req: Request, stuck: bool) -> bool:
        """Blocks for `req`, which did not get any. A waiting fork holds its parent's blocks before it runs:
        the last one other than `req` gives them up (and will recompute, finding full blocks in the prefix
        cache). If nothing else can run this step (`stuck`), held requests give theirs up too (their forks
        then recompute), and last `req` itself. True if blocks came free."""
        holders = [r for r in self.waiting if r.num_computed_tokens and r is not req]
        if holders:
            victim = holders[-1]
        elif stuck and (held := [r for r in self.held.values() if self.block_manager.block_ids(r.request_id)]):
            self.block_manager.free(held[-1])
            return True
        elif stuck and req.num_computed_tokens:
            victim = req
        else:
            return False
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        return True

    def _schedule(self, req: Request, num_new: int, new: bool, drafts: list[int] = ()) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        req.num_computed_tokens = end + len(drafts)
        num_known = len(req.all_token_ids)
        token_ids = req.all_token_ids[start:end] if start < num_known else []
        if len(token_ids) < num_new:
            token_ids += [PLACEHOLDER] * (num_new - len(token_ids))
        sample = end == num_known + req.num_output_placeholders
        if sample and req.sampling_params is not None:
            req.num_output_placeholders += 1  # until the engine reads the token
        if drafts:
            token_ids += drafts
        return ScheduledRequest(
            req.request_id, token_ids, start, self.block_manager.block_ids(req.request_id), sample,
            NewRequestData(req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                           req.sampling_params, req.prompt_embeds, req.pooling_params,
                           req.token_type_ids, req.lora_request) if new else None, len(drafts))

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(self.waiting, req, front=True)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, out of length, or aborted) and free its blocks (or, with `hold_kv`
        and a normal end, keep them until `release`)."""
        was_waiting = req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        req.status = status
        if was_waiting:
            self.waiting.remove(req)
        elif req in self.running:  # a scheduled pooling request is in neither queue
            self.running.remove(req)
        if req.hold_kv and status != RequestStatus.FINISHED_ABORTED:
            self.held[req.request_id] = req
        else:
            self.block_manager.free(req)
            self.block_manager.forget(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    def prepare_fork(self, parent_id: str, child: Request) -> None:
        """Give `child` (the held request's computed tokens and one more) the parent's KV: its full blocks
        shared, its partial last block shared with the first fork and copied for the others. Without a free
        block for the copy, the child starts from nothing (and finds the full blocks in the prefix cache)."""
        parent = self.held[parent_id]
        take_over = parent_id not in self._partial_taken
        forked, copy = self.block_manager.fork(parent, child, parent.num_computed_tokens, take_over)
        if not forked:
            return
        self._partial_taken.add(parent_id)
        if copy is not None:
            self._pending_copies.append(copy)
        child.num_computed_tokens = parent.num_computed_tokens

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (its forks keep the ones they share)."""
        req = self.held.pop(request_id, None)
        self._partial_taken.discard(request_id)
        if req is not None:
            self.block_manager.free(req)
            self.block_manager.forget(req)
