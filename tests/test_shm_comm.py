"""Shared-memory collectives for tensor-parallel ranks on one machine, against gloo's on the same tensors."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardserve.distributed import shm_comm

pytestmark = pytest.mark.skipif(not shm_comm.supported(), reason="shared-memory collectives need x86 and /dev/shm")


def _run(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    comm = shm_comm.ShmCommunicator.create(None, world, rank, src=0)
    assert comm is not None
    out = {}
    for name, shape in (("small", (16, 1024)), ("chunked", (700, 1024)), ("odd", (3, 5))):  # 700x1024 floats > 2 MB
        torch.manual_seed(100 + rank)
        x = torch.randn(shape)
        expected = x.clone()
        dist.all_reduce(expected)
        got = comm.all_reduce(x.clone())
        out[name] = (got, expected)
        gathered = comm.all_gather(x)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        out[name + "-gather"] = (torch.stack(gathered), torch.stack(parts))
    for step in range(200):  # many in a row: the alternating slot sets never let a fast rank overwrite
        x = torch.full((64,), float(rank + step))
        comm.all_reduce(x)
        assert torch.all(x == sum(r + step for r in range(world))), step
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_equal_gloo(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_run, args=(world, port, results), nprocs=world, join=True)
    for rank in range(world):
        for name, (got, expected) in results[rank].items():
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5, msg=f"{name} on rank {rank}")
    for name in results[0]:  # every rank holds the same bits
        assert all(torch.equal(results[0][name][0], results[r][name][0]) for r in range(world)), name
    assert not _leftover_segments()


def _leftover_segments() -> list[str]:
    """Segments still in /dev/shm. Ranks unlink theirs once all have mapped it; another process's segment
    exists for milliseconds while its ranks meet, so look twice before calling one left over."""
    import time
    for _ in range(2):
        found = [f for f in os.listdir("/dev/shm") if f.startswith("shardserve-tp-")]
        if not found:
            return []
        time.sleep(2)
    return found


def _run_state(rank: int, world: int, port: int, shm: str, results) -> None:
    from shardserve.distributed import parallel_state as ps
    torch.set_num_threads(1)
    os.environ["SHARDSERVE_SHM_COMM"] = shm
    ps.init_distributed(world, 1, rank, f"tcp://127.0.0.1:{port}", "gloo")
    x = torch.arange(12, dtype=torch.float32).view(3, 4) * (rank + 1)
    reduced = ps.tp_all_reduce(x.clone())
    gathered = ps.tp_all_gather_last_dim(x)
    results[rank] = (ps.tp_uses_shared_memory(), reduced, gathered, ps.comm_stats().calls)
    ps.destroy_distributed()


@pytest.mark.parametrize("shm", ["1", "0"])
def test_tensor_parallel_collectives_pick_shared_memory_or_gloo(shm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_run_state, args=(2, port, shm, results), nprocs=2, join=True)
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    for rank in range(2):
        uses_shm, reduced, gathered, calls = results[rank]
        assert uses_shm == (shm == "1") and calls == 2
        assert torch.equal(reduced, base * 3)
        assert torch.equal(gathered, torch.cat([base, base * 2], dim=-1))
