"""The GPU path (issue 8): bf16 greedy parity with transformers, CUDA graphs against eager, the memory
budget, and NCCL tensor parallelism. Skipped without CUDA (CI has none); run on a lent GPU with
`bash scripts/gpu-check.sh` (these, and the GPU cases of the kernel tests: Triton attention, fused kernels,
mixture-of-experts layers)."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import make_model_dir
from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.layers import gemv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
MEMORY = 0.3  # of the GPU per engine: an engine a test has not yet released must not starve the next one


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _prompts(vocab: int, lens=(5, 23, 40, 70), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _generate(llm, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def gpu_model_dirs(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_model_dir(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]
    return get


@pytest.mark.parametrize("arch, use_gemv", [(arch, False) for arch in ("llama", "qwen2", "qwen3", "opt", "gpt2")]
                         + [(arch, True) for arch in ("llama", "qwen2", "qwen3")])
def test_bf16_greedy_agrees_with_transformers(arch, use_gemv, gpu_model_dirs, monkeypatch):
    """Token agreement over 32 tokens; the sequences may part only where transformers' own two best
    logits at that position are within bf16 noise of each other. use_gemv: decode steps through layers/gemv.py."""
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(gemv, "ENABLED", use_gemv)
    path = gpu_model_dirs(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    prompts = _prompts(hf.config.vocab_size)
    llm = LLM(path, dtype="bfloat16", gpu_memory_utilization=MEMORY)
    ours = _generate(llm, prompts)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=NUM_TOKENS,
                              min_new_tokens=NUM_TOKENS, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
        ref = ref.tolist()
        diverged = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
        if diverged is None:
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ref[:diverged]], device="cuda")).logits[0, -1].float()
        top2 = logits.topk(2).values
        noise = 2 ** -7 * top2[0].abs().item() + 0.05  # a few bf16 ulps of the logit and of its inputs
        assert (top2[0] - top2[1]).item() <= noise, (
            f"{arch}: diverged at token {diverged} where transformers' margin is {(top2[0] - top2[1]).item():.3f}")


@pytest.mark.parametrize("use_gemv", [False, True])
def test_cuda_graphs_give_what_eager_gives(use_gemv, gpu_model_dirs, monkeypatch):
    monkeypatch.setattr(gemv, "ENABLED", use_gemv)  # graphs of up to 4 rows capture layers/gemv.py's kernels
    path = gpu_model_dirs("qwen3")
    prompts = _prompts(300, lens=[5, 9, 23, 40, 3, 17, 64])  # 7 rows: padded up to a captured size of 8
    eager = LLM(path, dtype="bfloat16", enforce_eager=True, attention_backend="triton",
                gpu_memory_utilization=MEMORY)
    assert eager.llm_engine.executor.worker.runner.graphs is None
    expected = _generate(eager, prompts)
    del eager
    gc.collect()
    # (vLLM's max_cudagraph_capture_size: the default sizes up to 8, of max_num_seqs' 16)
    graphed = LLM(path, dtype="bfloat16", attention_backend="triton", max_num_seqs=16, max_cudagraph_capture_size=8,
                  gpu_memory_utilization=MEMORY)
    graphs = graphed.llm_engine.executor.worker.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    assert _generate(graphed, prompts) == expected
    assert _generate(graphed, prompts[:1]) == expected[:1]  # a batch of one replays the smallest graph


def test_reloaded_weights_reach_the_cuda_graphs(gpu_model_dirs, tmp_path):
    """collective_rpc("reload_weights") copies into the parameters in place, so the decode graphs captured over
    the old weights' memory replay the new ones: the engine answers as one started on them, graphs and all."""
    first, second = gpu_model_dirs("qwen3"), make_model_dir(tmp_path / "seed1", "qwen3", seed=1)
    prompts = _prompts(300, lens=[5, 23, 3])
    engine = dict(dtype="bfloat16", attention_backend="triton", max_num_seqs=8, gpu_memory_utilization=MEMORY)
    fresh = LLM(second, **engine)
    expected = _generate(fresh, prompts)
    del fresh
    gc.collect()
    llm = LLM(first, **engine)
    assert llm.llm_engine.executor.worker.runner.graphs is not None
    before = _generate(llm, prompts)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": second})
    llm.reset_prefix_cache()
    assert _generate(llm, prompts) == expected != before


def test_speculative_decoding_on_the_gpu(gpu_model_dirs):
    """A step with drafts is k + 1 query rows per request through the paged decode path, replayed from the same
    CUDA graphs as plain decodes (and sampled on the device): greedy outputs are those without speculation, and
    drafts were accepted (the random model falls into loops that n-gram lookup finds)."""
    path = gpu_model_dirs("qwen3")
    prompts = _prompts(300, lens=[5, 23, 3, 40])
    engine = dict(dtype="float32", attention_backend="triton", max_num_seqs=8, gpu_memory_utilization=MEMORY)
    plain = LLM(path, **engine)
    expected = _generate(plain, prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    del plain
    gc.collect()
    llm = LLM(path, **engine, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                  "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    assert llm.llm_engine.executor.worker.runner.graphs is not None
    assert _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)) == expected
    assert llm.llm_engine.spec_decode_stats.num_accepted_tokens > 0


def test_gpu_memory_utilization_sizes_the_cache(gpu_model_dirs):
    """The cache gets what `gpu_memory_utilization` of the whole device leaves after the weights, a profiled
    full step and memory outside torch: another 0.2 of the device is another 0.2 of it in blocks. (The
    test model's cache is capped far below its budget by max_num_seqs x max_model_len, so the budget is
    read from the worker.)"""
    llm = LLM(gpu_model_dirs("llama"), dtype="bfloat16", gpu_memory_utilization=MEMORY, enforce_eager=True)
    worker = llm.llm_engine.executor.worker
    total = torch.cuda.mem_get_info()[1]
    assert torch.cuda.memory_reserved() <= MEMORY * total
    blocks = {}
    for utilization in (0.2, 0.4):
        worker.config.gpu_memory_utilization = utilization
        blocks[utilization] = worker.determine_num_blocks()
    assert blocks[0.2] > 0
    assert (blocks[0.4] - blocks[0.2]) * worker.kv_bytes_per_block() == pytest.approx(0.2 * total, rel=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_over_nccl_matches_one_gpu(ray_cluster, gpu_model_dirs):
    path = gpu_model_dirs("qwen3")
    prompts = _prompts(300)
    one = _generate(LLM(path, dtype="float32", enforce_eager=True, gpu_memory_utilization=MEMORY), prompts)
    gc.collect()
    two = LLM(path, dtype="float32", enforce_eager=True, tensor_parallel_size=2, gpu_memory_utilization=MEMORY)
    assert _generate(two, prompts) == one
