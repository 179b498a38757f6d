"""The block tables of the requests a worker holds, kept between steps as rows of one host array.

The scheduler sends each scheduled request's whole table every step, but a live request's table only grows
(blocks are appended as it runs; preemption frees them all and the request comes back as new), so a step writes
only the blocks added since the last, and a step's decode tables are one gather of rows. Rebuilding them as
lists every step and converting those was most of building a step's inputs at long contexts (256 decodes of
~1.1k tokens on this project's 2-core CPU: 0.85 ms of 1.1 per step; benchmarks/RESULTS.md). vLLM keeps its
batch's tables so too.
"""
from __future__ import annotations

import numpy as np


class BlockTables:
    def __init__(self, rows: int = 64, max_blocks: int = 64):
        self.table = np.zeros((rows, max_blocks), np.int64)   # entries past a row's length are 0
        self.lens = [0] * rows                                # each row's number of blocks
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(rows - 1, -1, -1))

    def add(self, request_id: str) -> None:
        """A row for a request the worker starts holding (or, seen again after preemption, its row emptied)."""
        row = self.row_of.get(request_id)
        if row is not None:
            self._clear(row)
            return
        if not self._free_rows:
            n = len(self.lens)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lens += [0] * n
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        self.row_of[request_id] = self._free_rows.pop()

    def remove(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._clear(row)
            self._free_rows.append(row)

    def _clear(self, row: int) -> None:
        self.table[row, :self.lens[row]] = 0
        self.lens[row] = 0

    def update(self, row: int, block_ids: list[int]) -> None:
        """Bring a row up to the scheduler's table of its request: the blocks appended since the last step."""
        n, known = len(block_ids), self.lens[row]
        if n > self.table.shape[1]:
            grown = np.zeros((len(self.lens), max(n, 2 * self.table.shape[1])), np.int64)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        if n < known:  # never while a request lives; kept exact all the same
            self.table[row, n:known] = 0
        else:
            self.table[row, known:n] = block_ids[known:]
        self.lens[row] = n

    def slots(self, row: int, block_size: int, num_tokens: int) -> np.ndarray:
        """The cache slot of each of the row's first `num_tokens` tokens."""
        num_blocks = -(-num_tokens // block_size)
        blocks = self.table[row, :num_blocks]
        return (blocks[:, None] * block_size + np.arange(block_size)).ravel()[:num_tokens]
