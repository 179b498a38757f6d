"""All-reduce and all-gather through shared memory, for the tensor-parallel ranks of one machine on CPU.

gloo over loopback costs milliseconds per collective, and a decode step has two per layer. Ranks on one
machine can instead write their tensors into one shared segment (a file in /dev/shm mapped by every rank)
and read each other's: each rank copies its tensor into its own slot, publishes a sequence number, waits
until every rank has published the same number, then reads the slots in rank order, so every rank
computes the same sum. Two sets of slots, used alternately, let a rank that finishes early start the next
collective without overwriting a slot a slower rank is still reading (it cannot get two ahead, since it
waits for everyone's publication of the one in between). Tensors bigger than a slot go through in chunks.

The stores that fill a slot are ordered before the store that publishes it only on x86's total store
order, so other architectures keep gloo.
"""
from __future__ import annotations

import logging
import os
import platform
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_FLAG_STRIDE = 8          # int64s between two ranks' sequence numbers: one 64-byte cache line each
_SLOT_BYTES = 2 << 20     # per rank and set; bigger tensors go in chunks
_SPIN_S = 2e-4            # yield-spin this long before sleeping between polls
_TIMEOUT_S = 600.0        # as long as the process groups wait


def supported() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")
            and os.environ.get("SHARDSERVE_SHM_COMM", "1") != "0")


class ShmCommunicator:
    """Collectives among the ranks of `group` (a torch.distributed group of `world` ranks, this one
    `rank` within it) through a segment they all map. Build it with `create`, which returns None where
    the ranks cannot share memory (different machines or containers): the caller keeps gloo."""

    def __init__(self, buffer: torch.Tensor, world: int, rank: int):
        self.world, self.rank = world, rank
        header = world * _FLAG_STRIDE * 8
        self._flags = buffer[:header].numpy().view(np.int64)
        slots = buffer[header:header + 2 * world * _SLOT_BYTES]
        self._slots = slots.view(2, world, _SLOT_BYTES)   # [set, rank, bytes]
        self._seq = 0

    @classmethod
    def create(cls, group, world: int, rank: int, src: int) -> ShmCommunicator | None:
        """Collective over `group` (`src` is its first rank, global numbering): rank 0 creates the segment and
        stamps it with a random token; every rank maps it and checks the token; all of them agree to use it
        or not. The file is unlinked once all have mapped it, so nothing outlives the processes."""
        size = world * _FLAG_STRIDE * 8 + 2 * world * _SLOT_BYTES + 16
        token = uuid.uuid4().bytes
        where = [None]
        if rank == 0:
            path = f"/dev/shm/shardserve-tp-{uuid.uuid4().hex}"
            try:
                with open(path, "wb") as f:
                    f.truncate(size)
                    f.seek(size - 16)
                    f.write(token)
                where = [(path, token)]
            except OSError as e:
                logger.info("No shared-memory collectives (%s); using gloo.", e)
        dist.broadcast_object_list(where, src=src, group=group)
        buffer = None
        if where[0] is not None:
            path, token = where[0]
            try:
                buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                if bytes(buffer[size - 16:].numpy()) != token:  # another machine's file of the same name
                    buffer = None
            except (OSError, RuntimeError):
                buffer = None
        agreed = torch.tensor([0 if buffer is None else 1], dtype=torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if rank == 0 and where[0] is not None:
            os.unlink(where[0][0])  # every rank has mapped it (or given up) by now
        if not agreed.item():
            return None
        return cls(buffer, world, rank)

    def _publish_and_wait(self, chunk: torch.Tensor) -> torch.Tensor:
        """Write `chunk` (flat, contiguous) into this rank's slot, wait for every rank's, and return the
        set's slots as [world, bytes] of the chunk's byte size."""
        self._seq += 1
        nbytes = chunk.numel() * chunk.element_size()
        slots = self._slots[self._seq % 2]
        slots[self.rank, :nbytes].copy_(chunk.view(torch.uint8))
        flags, seq = self._flags, self._seq
        flags[self.rank * _FLAG_STRIDE] = seq
        start = time.perf_counter()
        for r in range(self.world):
            while flags[r * _FLAG_STRIDE] < seq:
                waited = time.perf_counter() - start
                if waited < _SPIN_S:
                    os.sched_yield()
                elif waited < _TIMEOUT_S:
                    time.sleep(5e-5)
                else:
                    raise RuntimeError(f"Tensor-parallel rank {r} did not join a collective within "
                                       f"{_TIMEOUT_S:.0f} s.")
        return slots[:, :nbytes]

    def _chunks(self, x: torch.Tensor):
        flat = x.reshape(-1)
        step = _SLOT_BYTES // x.element_size()
        for begin in range(0, flat.numel(), step):
            yield flat[begin:begin + step]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `x` (contiguous), in place; the same bits on every rank."""
        for chunk in self._chunks(x):
            parts = self._publish_and_wait(chunk).view(x.dtype)
            torch.sum(parts, dim=0, out=chunk) if self.world > 2 else torch.add(parts[0], parts[1], out=chunk)
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (contiguous, the same shape on every rank), in rank order."""
        out = torch.empty((self.world, x.numel()), dtype=x.dtype)
        begin = 0
        for chunk in self._chunks(x):
            parts = self._publish_and_wait(chunk).view(x.dtype)
            out[:, begin:begin + chunk.numel()].copy_(parts)
            begin += chunk.numel()
        return [part.view(x.shape) for part in out]
