"""Tensor and pipeline parallelism on Ray worker actors (gloo on the CPU), proven against TP = PP = 1.

All tests share the session's Ray cluster (a head and two more nodes on loopback). Workers get half a
CPU each so four of them fit the head node of this 2-core machine.
"""
from __future__ import annotations

import ctypes.util
import os
import threading
import time
from pathlib import Path

import pytest
import ray

from shardserve import LLM, SamplingParams, StructuredOutputsParams
from shardserve.distributed import shm_comm
from shardserve.executor.ray import WorkerDiedError
from shardserve.lora.request import LoRARequest

pytestmark = pytest.mark.timeout(300)

PROMPTS = [
    "The quick brown fox",
    "Hello, world! Streaming text one token at a time is how servers answer.",  # > 16 tokens: prefill path
    "def add(a, b):\n    return",
]
_GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, prompt_logprobs=5)
# one per prompt: free, and two structured outputs (the step's grammar bitmask travels to every worker)
PARAMS = [_GREEDY, _GREEDY.clone(structured_outputs=StructuredOutputsParams(regex="[a-z ]{3,30}[.]")),
          _GREEDY.clone(structured_outputs=StructuredOutputsParams(choice=["return a + b", "pass"]))]
ENGINE = dict(max_num_seqs=8, kv_cache_memory_bytes=1 << 26, seed=0)


def assert_same_logprobs(got: list, ref: list) -> None:
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert set(g) == set(r)
        for token_id, lp in r.items():
            assert g[token_id].logprob == pytest.approx(lp.logprob, abs=1e-4)


def assert_same_outputs(got, ref) -> None:
    for g, r in zip(got, ref):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert_same_logprobs(g.outputs[0].logprobs, r.outputs[0].logprobs)
        assert_same_logprobs(g.prompt_logprobs, r.prompt_logprobs)


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The in-process TP = PP = 1 outputs of a model, computed once per model."""
    cache = {}

    def get(model_dir: str):
        if model_dir not in cache:
            llm = LLM(model_dir, **ENGINE)
            total = llm.llm_engine.executor.collective_rpc("num_parameter_elements")[0]
            cache[model_dir] = (llm.generate(PROMPTS, PARAMS, use_tqdm=False), total)
        return cache[model_dir]
    return get


@pytest.mark.parametrize("arch, second", [("llama", "qv"), ("qwen2_moe", "stacked")])
def test_lora_adapters_split_with_their_layers(ray_cluster, model_dirs, lora_dirs, arch, second):
    """Each rank keeps its slice of an adapter (column-parallel layers the rows of B, row-parallel ones the
    columns of A, added before the all-reduce; each expert's likewise) and each stage its own layers' pairs:
    under TP = PP = 2, requests through two adapters and through none answer as they do on one worker (for a
    mixture of experts, adapters of its experts in both of PEFT's formats)."""
    model_dir = model_dirs(arch)
    loras = [LoRARequest("all", 1, lora_dirs(arch, "all")), None, LoRARequest(second, 2, lora_dirs(arch, second))]
    lora_engine = dict(ENGINE, enable_lora=True, max_loras=2, max_lora_rank=8)
    single = LLM(model_dir, **lora_engine)
    expected = single.generate(PROMPTS, PARAMS, use_tqdm=False, lora_request=loras)
    single.shutdown()
    llm = LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_worker=0.5, **lora_engine)
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora_request=loras), expected)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_worker(ray_cluster, model_dirs, reference, arch, tp, pp):
    model_dir = model_dirs(arch)
    ref_outputs, total_params = reference(model_dir)
    llm = LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, num_cpus_per_worker=0.5, **ENGINE)
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS, use_tqdm=False), ref_outputs)
        # Each rank holds only its shard: about 1/(T*P) of the weights (norms are replicated), and
        # together the ranks hold all of them.
        per_rank = llm.llm_engine.executor.collective_rpc("num_parameter_elements")
        assert len(per_rank) == tp * pp
        assert max(per_rank) <= total_params / (tp * pp) * 1.15
        assert sum(per_rank) >= total_params
        # tensor ranks on one machine reduce through shared memory, not gloo over loopback
        stats = llm.llm_engine.executor.collective_rpc("comm_stats")
        assert all(s["shared_memory"] == (tp > 1 and shm_comm.supported()) for s in stats)
        # the worker processes started on tcmalloc where it is installed (workers/cpu_malloc.py)
        tcmalloc = bool(ctypes.util.find_library("tcmalloc_minimal"))
        for info in llm.llm_engine.executor.node_info:
            assert ("tcmalloc" in Path(f"/proc/{info['pid']}/maps").read_text()) == tcmalloc
    finally:
        llm.shutdown()


def test_beam_search_forks_kv_on_every_rank(ray_cluster, model_dirs):
    """Beam search forks KV blocks (copying partial ones) on each worker's shard of the cache: TP=2 x PP=2
    finds the same beams as one process."""
    from shardserve import BeamSearchParams
    model_dir = model_dirs("llama")
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    common = dict(block_size=4, max_num_seqs=8, kv_cache_memory_bytes=1 << 26)
    ref = LLM(model_dir, **common).beam_search(PROMPTS, params)
    llm = LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_worker=0.5, **common)
    try:
        got = llm.beam_search(PROMPTS, params)
        for g, r in zip(got, ref):
            assert [s.tokens for s in g.sequences] == [s.tokens for s in r.sequences]
            assert [s.cum_logprob for s in g.sequences] == pytest.approx([s.cum_logprob for s in r.sequences],
                                                                         abs=1e-4)
    finally:
        llm.shutdown()


def test_speculative_decoding_under_tp_and_pp(ray_cluster, model_dirs):
    """Drafts are verified on the last stage's tensor ranks, and the tokens they accept reach the earlier stage
    only as KV it computed for them: TP=2 x PP=2 with n-gram speculation answers as one process without it."""
    model_dir = model_dirs("llama")
    prompts = ["the cat sat on the mat and the cat sat on the mat and the", "1 2 3 4 1 2 3 4 1 2 3", *PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=2, prompt_logprobs=1)
    ref = LLM(model_dir, **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1})
    try:
        assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), ref)
        assert llm.llm_engine.spec_decode_stats.num_accepted_tokens > 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "opt", "gpt2", "gemma3", "mixtral", "qwen2_moe"])
def test_every_family_under_tp_and_pp(ray_cluster, model_dirs, reference, arch):
    """The other families at TP=2 x PP=2; Qwen2, OPT, GPT-2 and Gemma 3 tie their LM head to the embedding,
    which then lives on another stage (Gemma 3's scaled one: the head takes the unscaled matrix). Mixtures
    of experts split every expert's MLP (and Qwen2-MoE's shared expert) across the tensor ranks."""
    model_dir = model_dirs(arch)
    ref_outputs, _ = reference(model_dir)
    llm = LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS, use_tqdm=False), ref_outputs)
        # The GPU memory profile's forward runs on every rank at once: later stages from stand-in inputs,
        # tensor ranks through their collectives.
        llm.llm_engine.executor.collective_rpc("profile_run", 40, 16)
    finally:
        llm.shutdown()


def test_fewer_kv_heads_than_tensor_ranks(ray_cluster, model_dirs, reference):
    model_dir = model_dirs("llama", num_key_value_heads=1)
    ref_outputs, _ = reference(model_dir)
    llm = LLM(model_dir, tensor_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS, use_tqdm=False), ref_outputs)
    finally:
        llm.shutdown()


def test_stages_on_different_nodes(ray_cluster, model_dirs, reference):
    model_dir = model_dirs("llama")
    ref_outputs, _ = reference(model_dir)
    llm = LLM(model_dir, pipeline_parallel_size=2, placement_group_strategy="STRICT_SPREAD",
              num_cpus_per_worker=0.5, **ENGINE)
    try:
        nodes = [info["node_id"] for info in llm.llm_engine.executor.node_info]
        assert len(set(nodes)) == 2
        assert_same_outputs(llm.generate(PROMPTS, PARAMS, use_tqdm=False), ref_outputs)
    finally:
        llm.shutdown()


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_killed_worker_fails_fast_and_cluster_recovers(ray_cluster, model_dirs):
    model_dir = model_dirs("llama")
    llm = LLM(model_dir, tensor_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    executor = llm.llm_engine.executor
    killed_at = []

    def kill_soon():
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        ray.kill(executor.workers[1])

    threading.Thread(target=kill_soon, daemon=True).start()
    long_run = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with pytest.raises(WorkerDiedError, match="tensor rank 1|rank 1"):
        llm.generate(PROMPTS * 4, long_run, use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 10
    assert not llm.llm_engine.has_unfinished_requests()
    # The replica stays dead (no hang), and its other worker process is gone too.
    with pytest.raises(WorkerDiedError):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert all(_gone(info["pid"]) for info in executor.node_info)

    fresh = LLM(model_dir, tensor_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    try:
        out = fresh.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        fresh.shutdown()


def test_shutdown_releases_placement_group_and_processes(ray_cluster, model_dirs):
    llm = LLM(model_dirs("llama"), tensor_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    executor = llm.llm_engine.executor
    group_id = executor.placement.group.id.hex()
    llm.shutdown()
    assert ray.util.placement_group_table()[group_id]["state"] == "REMOVED"
    assert all(_gone(info["pid"]) for info in executor.node_info)


def test_bad_parallel_configs_fail_before_workers_start(model_dirs):
    model_dir = model_dirs("llama")
    with pytest.raises(ValueError, match="distributed_executor_backend='ray'"):
        LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="uni", **ENGINE)
    with pytest.raises(ValueError, match="pipeline stages"):
        LLM(model_dir, pipeline_parallel_size=3, **ENGINE)  # 2 layers cannot make 3 stages
    with pytest.raises(ValueError, match="pipeline stages"):
        LLM(model_dir, pipeline_parallel_size=2, pp_layer_partition=[2, 1], **ENGINE)
    with pytest.raises(ValueError, match="not divisible"):
        LLM(model_dir, tensor_parallel_size=3, **ENGINE)
