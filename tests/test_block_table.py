"""The worker's persistent block tables (workers/block_table.py) hold, row for row, what the scheduler's tables
say, through growth, preemption, retirement and reuse of rows; end to end, the greedy-parity tests run them
under preemption and prefix caching."""
import random

import numpy as np

from shardserve.workers.block_table import BlockTables


def test_rows_follow_the_scheduler_tables_through_growth_preemption_and_reuse():
    rng = random.Random(0)
    tables = BlockTables(rows=2, max_blocks=2)   # small, so rows and columns both have to grow
    live: dict[str, list[int]] = {}              # the scheduler's tables of the requests the worker holds
    next_id = 0
    for _ in range(2000):
        action = rng.random()
        if action < 0.15 or not live:            # a new request
            rid = f"r{next_id}"
            next_id += 1
            tables.add(rid)
            live[rid] = []
        elif action < 0.2:                       # retired: its row is freed for the next request
            rid = rng.choice(sorted(live))
            tables.remove(rid)
            del live[rid]
        elif action < 0.25:                      # preempted: all blocks freed, seen again as new
            rid = rng.choice(sorted(live))
            tables.add(rid)
            live[rid] = []
        else:                                    # scheduled: maybe a few blocks more
            rid = rng.choice(sorted(live))
            live[rid] = live[rid] + [rng.randrange(1000) for _ in range(rng.choice([0, 0, 1, 3]))]
            tables.update(tables.row_of[rid], live[rid])
        assert len(set(tables.row_of.values())) == len(tables.row_of) == len(live)
        for rid, blocks in live.items():
            row = tables.row_of[rid]
            if tables.lens[row] != len(blocks):  # not scheduled since it grew: the next step brings it up
                tables.update(row, blocks)
            assert tables.table[row, :len(blocks)].tolist() == blocks
            assert not tables.table[row, len(blocks):].any()   # padded with 0, as the backends are told
    assert tables.table.shape[0] >= len(live) and tables.table.shape[1] > 2


def test_slots_of_a_row_are_each_tokens_block_and_offset():
    tables = BlockTables()
    tables.add("a")
    blocks, bs = [7, 3, 11], 4
    tables.update(tables.row_of["a"], blocks)
    for n in (1, 4, 5, 12):
        expected = [blocks[p // bs] * bs + p % bs for p in range(n)]
        assert tables.slots(tables.row_of["a"], bs, n).tolist() == expected
    assert tables.slots(tables.row_of["a"], bs, 5).dtype == np.int64
