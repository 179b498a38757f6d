"""The scheduler's policies on their own (no model): which waiting request runs next, which running request
gives up its KV blocks when they run out, and where a preempted request waits."""
from __future__ import annotations

import pytest

from shardserve.engine.block_manager import BlockManager
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from shardserve.sampling_params import SamplingParams


def _request(request_id: str, priority: int, arrival: float, num_tokens: int = 4) -> Request:
    return Request(request_id, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=100), priority=priority,
                   arrival_time=arrival)


def _step(scheduler: Scheduler) -> list[str]:
    """One step as the engine runs it: every request that reaches its end samples a token, which the engine reads."""
    out = scheduler.schedule()
    for s in out.scheduled:
        if s.sample:
            scheduler.requests[s.request_id].num_output_placeholders -= 1
            scheduler.requests[s.request_id].append_token(7)
    return [s.request_id for s in out.scheduled]


@pytest.mark.parametrize("policy,expected", [("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "c", "a"])])
def test_waiting_requests_run_in_the_policys_order(policy, expected):
    """One sequence at a time: fcfs by arrival; priority by priority (lower first), arrival breaking ties."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy=policy)
    for request_id, priority, arrival in [("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)]:
        scheduler.add_request(_request(request_id, priority, arrival))
    order = []
    while scheduler.has_unfinished_requests():
        (request_id,) = _step(scheduler)
        order.append(request_id)
        scheduler.finish(scheduler.requests[request_id], RequestStatus.FINISHED_STOPPED)
    assert order == expected


@pytest.mark.parametrize("policy,victim,waiting", [
    # fcfs: the most recently admitted gives way, and waits at the head of the queue
    ("fcfs", "z", ["z", "w"]),
    # priority: the least urgent gives way (admitted first here), and waits behind the more urgent w
    ("priority", "x", ["w", "x"]),
])
def test_out_of_blocks_the_policys_victim_gives_way(policy, victim, waiting):
    """Three 4-token prompts fill three of four 4-token blocks; each first decode token needs a new block,
    so one of the three must be preempted for the others to go on."""
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, policy=policy)
    for request_id, priority, arrival in [("x", 5, 0.0), ("y", 0, 1.0), ("z", 3, 2.0)]:
        scheduler.add_request(_request(request_id, priority, arrival))
    assert sorted(_step(scheduler)) == ["x", "y", "z"]
    scheduler.add_request(_request("w", 4, 3.0))
    scheduled = _step(scheduler)
    assert victim not in scheduled and sorted(scheduled + [victim]) == ["x", "y", "z"]
    assert scheduler.num_preemptions == 1
    assert scheduler.requests[victim].status == RequestStatus.PREEMPTED
    assert scheduler.requests[victim].num_computed_tokens == 0
    assert [r.request_id for r in scheduler.waiting] == waiting
    # The two left hold their prompt block and their new one; nothing is lost or shared.
    held = [b for r in ("x", "y", "z") for b in scheduler.block_manager.block_ids(r)]
    assert len(held) == len(set(held)) == 4 and scheduler.block_manager.num_free_blocks == 0


@pytest.mark.parametrize("chunked", [True, False])
def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it(chunked):
    """A budget of 16 tokens a step with two requests decoding: a 15-token prompt is chunked into what is left
    (14, then 1), or, with chunked prefill off (vLLM's enable_chunked_prefill=False), waits in its place until a
    step has room for all 15 tokens, and the request behind it waits behind it."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16, chunked_prefill=chunked)
    for request_id, num_tokens in [("a", 1), ("b", 1)]:
        scheduler.add_request(_request(request_id, 0, 0.0, num_tokens))
    assert _step(scheduler) == ["a", "b"]
    scheduler.add_request(_request("long", 0, 1.0, 15))
    scheduler.add_request(_request("short", 0, 2.0, 1))
    out = scheduler.schedule()
    got = {s.request_id: len(s.token_ids) for s in out.scheduled}
    if chunked:
        assert got == {"a": 1, "b": 1, "long": 14}
    else:
        assert got == {"a": 1, "b": 1}
        assert [r.request_id for r in scheduler.waiting] == ["long", "short"]
        for request_id in ("a", "b"):
            scheduler.finish(scheduler.requests[request_id], RequestStatus.FINISHED_STOPPED)
        assert {s.request_id: len(s.token_ids) for s in scheduler.schedule().scheduled} == {"long": 15, "short": 1}
