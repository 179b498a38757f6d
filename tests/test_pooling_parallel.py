"""Pooling models on Ray worker actors at TP=2 x PP=2 (gloo on the CPU), proven against TP = PP = 1: each
rank holds its shard of the encoder or decoder, the last stage pools, pair scores and embeddings match.
"""
from __future__ import annotations

import pytest
import torch

from shardserve import LLM

pytestmark = pytest.mark.timeout(300)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "def add(a, b): return a + b"]
PAIRS = (["What is the capital of France?", "Hello"], ["The capital of France is Paris.", "world"])


def _run(llm: LLM, kind: str) -> list[torch.Tensor]:
    if kind == "score":
        return [torch.tensor(o.outputs.score) for o in llm.score(*PAIRS, use_tqdm=False)]
    return [torch.tensor(o.outputs.embedding) for o in llm.embed(TEXTS, use_tqdm=False)]


@pytest.mark.parametrize("model, kind", [("bert-classify", "score"), ("qwen3", "embed")])
def test_pooling_under_tensor_and_pipeline_parallelism(ray_cluster, encoder_dirs, model_dirs, model, kind):
    model_dir = model_dirs("qwen3") if model == "qwen3" else encoder_dirs("bert", "classify", num_labels=1)
    runner = dict(runner="pooling", seed=0)
    expected = _run(LLM(model_dir, **runner), kind)
    llm = LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_worker=0.5, **runner)
    try:
        for got, ref in zip(_run(llm, kind), expected):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    finally:
        llm.shutdown()
