"""Decode steps replayed from CUDA graphs.

A decode step of a small model is mostly kernel-launch overhead: hundreds of launches for a few
microseconds of work each. The model's forward over a decode batch is captured once per batch size in
`sizes`; a step pads its batch up to the next captured size and replays that graph after copying its inputs
into the graph's static buffers. Padding rows write their K/V nowhere (slot -1) and attend to one key, and
their outputs are dropped.

What a captured forward may not do: synchronise with the host, or change shape with the data. So only
attention backends whose decode grid depends on sizes known on the host take part
(`supports_cuda_graphs`), the block table is always as wide as max_model_len needs, and logits and
sampling run eagerly after the replay.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from shardserve.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_num_seqs] + list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model, sizes: list[int], max_blocks_per_seq: int, block_size: int, device: torch.device,
                 use_graphs: bool = True):
        self.model = model
        # False: the same static buffers and padding, with the forward run eagerly at each replay (tests the
        # bookkeeping on a CPU, where there are no graphs to capture)
        self.use_graphs = use_graphs
        self.num_replays = 0
        self.sizes = sorted(set(sizes))
        self.block_size = block_size
        largest = self.sizes[-1]
        # Static inputs: every graph reads its first `size` rows of these.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_size=self.block_size,
                                 num_decode_tokens=size, decode_block_tables=self.block_tables[:size],
                                 decode_seq_lens=self.seq_lens[:size])

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs fit in its memory pool
            args = (self.input_ids[:size], self.positions[:size])
            self.model(*args, self._meta(size))  # eager once: kernels compiled and autotuned outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args, self._meta(size))
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("CUDA graphs captured for decode batches of %s tokens in %.1f s", self.sizes,
                    time.perf_counter() - start)

    def can_run(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        """A decode-only step that fits the largest graph."""
        return (num_tokens <= self.sizes[-1] and not meta.prefills and meta.num_decode_tokens == num_tokens
                and meta.decode_block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = len(input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = meta.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        # Table entries past a row's length are never read, so stale ones beyond `width` may stay.
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.num_replays += 1
        if not self.use_graphs:
            return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))[:n]
        self.graphs[size].replay()
        return self.outputs[size][:n]
