"""Which shard this process holds, and the collectives that join the shards.

A replica of T x P workers has global ranks `pp_rank * T + tp_rank`. Each pipeline stage is one
tensor-parallel group (T consecutive ranks); each tensor rank links the stages through its pipeline
group (ranks t, T + t, 2T + t, ...). In process (TP = PP = 1) both groups are the trivial group of one.

Time spent inside collectives is accumulated so benchmarks can report communication per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shardserve.distributed import shm_comm


@dataclass
class ParallelGroup:
    ranks: list[int]                       # global ranks, in group order
    rank_in_group: int
    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1

    @property
    def next_rank(self) -> int:
        return self.ranks[self.rank_in_group + 1]

    @property
    def prev_rank(self) -> int:
        return self.ranks[self.rank_in_group - 1]


@dataclass
class CommStats:
    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0


_TP = ParallelGroup([0], 0)
_PP = ParallelGroup([0], 0)
_STATS = CommStats()
_TP_SHM: shm_comm.ShmCommunicator | None = None   # the TP group's collectives when its ranks share a machine


def init_distributed(tp_size: int, pp_size: int, rank: int, init_method: str, backend: str,
                     timeout_s: float = 600.0) -> None:
    """Join the replica's world and build its TP and PP groups. Every rank makes every group, in the same
    order, as torch.distributed requires."""
    global _TP, _PP, _TP_SHM
    world = tp_size * pp_size
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=timedelta(seconds=timeout_s))
    pp_rank, tp_rank = divmod(rank, tp_size)
    for p in range(pp_size):
        ranks = list(range(p * tp_size, (p + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if p == pp_rank:
            _TP = ParallelGroup(ranks, tp_rank, group)
    for t in range(tp_size):
        ranks = list(range(t, world, tp_size))
        group = dist.new_group(ranks) if pp_size > 1 else None
        if t == tp_rank:
            _PP = ParallelGroup(ranks, pp_rank, group)
    if backend == "gloo" and tp_size > 1 and shm_comm.supported():
        _TP_SHM = shm_comm.ShmCommunicator.create(_TP.group, tp_size, tp_rank, src=_TP.ranks[0])


def tp_uses_shared_memory() -> bool:
    return _TP_SHM is not None


def destroy_distributed() -> None:
    global _TP, _PP, _TP_SHM
    _TP_SHM = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP, _PP = ParallelGroup([0], 0), ParallelGroup([0], 0)


def get_tp_group() -> ParallelGroup:
    return _TP


def get_pp_group() -> ParallelGroup:
    return _PP


def get_tp_rank() -> int:
    return _TP.rank_in_group


def get_tp_size() -> int:
    return _TP.size


def comm_stats() -> CommStats:
    return _STATS


def _timed(fn, nbytes: int):
    start = time.perf_counter()
    result = fn()
    _STATS.seconds += time.perf_counter() - start
    _STATS.calls += 1
    _STATS.bytes += nbytes
    return result


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size > 1:
        if _TP_SHM is not None:
            x = x.contiguous()
            _timed(lambda: _TP_SHM.all_reduce(x), x.numel() * x.element_size())
        else:
            _timed(lambda: dist.all_reduce(x, group=_TP.group), x.numel() * x.element_size())
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    x = x.contiguous()
    nbytes = x.numel() * x.element_size() * _TP.size
    if _TP_SHM is not None:
        parts = _timed(lambda: _TP_SHM.all_gather(x), nbytes)
    else:
        parts = [torch.empty_like(x) for _ in range(_TP.size)]
        _timed(lambda: dist.all_gather(parts, x, group=_TP.group), nbytes)
    return torch.cat(parts, dim=-1)


def pp_send(tensors: dict[str, torch.Tensor]) -> None:
    """Send a stage's outputs to the same tensor rank of the next stage, in key order."""
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        _timed(lambda: dist.send(t, dst=_PP.next_rank), t.numel() * t.element_size())


def pp_recv(empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill `empty` (tensors of the expected shapes) from the previous stage, in the key order of pp_send."""
    for key in sorted(empty):
        t = empty[key]
        _timed(lambda: dist.recv(t, src=_PP.prev_rank), t.numel() * t.element_size())
    return empty
