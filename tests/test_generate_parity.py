"""Every supported architecture against Hugging Face transformers on the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS
from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.layers.attention import triton_backend

PROMPT_LENS = [5, 23, 40]
NUM_TOKENS = 32


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def references(model_dirs):
    """arch -> (model dir, hf model, prompts, hf greedy tokens)."""
    refs = {}

    def get(arch):
        if arch not in refs:
            path = model_dirs(arch)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            hf.generation_config.eos_token_id = None
            prompts = _prompts(hf.config.vocab_size)
            with torch.no_grad():
                greedy = [_hf_greedy(hf, p, NUM_TOKENS) for p in prompts]
            refs[arch] = (path, hf, prompts, greedy)
        return refs[arch]
    return get


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts, params=GREEDY):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers_log_softmax(arch, references):
    """Prefill logits, seen through prompt_logprobs: every prompt position against transformers."""
    path, hf, prompts, _ = references(arch)
    llm = LLM(path, dtype="float32")
    outs = _generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5,
                                                  ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            entry = out.prompt_logprobs[pos]
            actual = prompt[pos]
            assert entry[actual].logprob == pytest.approx(ref[pos - 1, actual].item(), abs=1e-4)
            top = ref[pos - 1].topk(5)
            for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                assert entry[token].logprob == pytest.approx(value, abs=1e-4)
                if token != actual:
                    assert entry[token].rank == rank


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(arch, references):
    path, _, prompts, greedy = references(arch)
    llm = LLM(path, dtype="float32")
    outs = _generate(llm, prompts)
    for out, expected in zip(outs, greedy):
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gemma3"])
def test_greedy_same_under_prefix_cache_chunking_and_preemption(arch, references):
    path, _, prompts, greedy = references(arch)
    shared = prompts[2][:32]
    # Two prompts sharing a 32-token prefix (two full blocks), so the second run hits the cache.
    variants = {
        "no-prefix-cache": dict(enable_prefix_caching=False),
        "prefix-cache": dict(enable_prefix_caching=True),
        "chunked-prefill": dict(max_num_batched_tokens=8),
        # 9 blocks of 16 tokens cannot hold the three sequences (3 + 4 + 5 blocks at the end): someone is preempted.
        "preemption": dict(num_gpu_blocks_override=9, max_model_len=128),
        # The same, with the first (shortest) prompt the least urgent: it gives way, not the last admitted.
        "priority-preemption": dict(num_gpu_blocks_override=9, max_model_len=128, scheduling_policy="priority"),
    }
    for name, kwargs in variants.items():
        llm = LLM(path, dtype="float32", block_size=16, **kwargs)
        priority = [2, 0, 1] if name == "priority-preemption" else None
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], GREEDY, use_tqdm=False,
                            priority=priority)
        assert [o.outputs[0].token_ids for o in outs] == greedy, name
        if name == "prefix-cache":
            first = _generate(llm, [shared + [5, 6, 7]])[0]
            again = _generate(llm, [shared + [9, 8]])[0]
            assert again.num_cached_tokens == 32
            assert llm.llm_engine.scheduler.block_manager.stats.hits >= 32
            assert first.outputs[0].token_ids  # the first one computed everything itself
        if name.endswith("preemption"):
            assert llm.llm_engine.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"


def test_output_does_not_depend_on_the_batch(references):
    path, _, prompts, greedy = references("llama")
    llm = LLM(path, dtype="float32")
    alone = _generate(llm, [prompts[1]])[0].outputs[0].token_ids
    filler = [[7] * 31, [11] * 3, [13] * 57]
    batched = _generate(llm, filler[:1] + [prompts[1]] + filler[1:])[1].outputs[0].token_ids
    assert alone == batched == greedy[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(dtype, references):
    path, hf, prompts, _ = references("qwen2")
    llm = LLM(path, dtype=dtype)
    worker = llm.llm_engine.executor.worker
    assert worker.kv_caches[0].dtype == getattr(torch, dtype)
    assert next(worker.model.parameters()).dtype == getattr(torch, dtype)
    out = _generate(llm, prompts[1:2], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0,
                                                      ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[1]])).logits[0].log_softmax(-1)
    for pos in range(1, len(prompts[1])):
        token = prompts[1][pos]
        assert out.prompt_logprobs[pos][token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=0.25)
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("config_dtype", ["bfloat16", "float16", "float32"])
def test_auto_dtype_on_a_cpu_runs_bf16_checkpoints_in_bf16_where_onednn_can(config_dtype, references, tmp_path):
    """As vLLM on a CPU: a bf16 checkpoint runs in bf16 where the CPU multiplies bf16 (oneDNN: AVX-512 and up),
    else in fp32; fp16 and fp32 checkpoints in fp32. On a GPU the checkpoint's dtype."""
    import json
    from shardserve.config import resolve_dtype
    from shardserve.layers.cpu_gemm import onednn_bf16_available
    path, _, _, _ = references("qwen2")
    for f in Path(path).iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    config = json.loads((Path(path) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"dtype": config_dtype, "torch_dtype": config_dtype}))
    expected = torch.bfloat16 if config_dtype == "bfloat16" and onednn_bf16_available() else torch.float32
    worker = LLM(str(tmp_path)).llm_engine.executor.worker
    assert worker.dtype == expected and next(worker.model.parameters()).dtype == expected
    assert worker.kv_caches[0].dtype == expected
    hf_config = type("Config", (), {"dtype": config_dtype})()
    assert resolve_dtype("auto", hf_config, torch.device("cuda")) == getattr(torch, config_dtype)
    assert resolve_dtype("float16", hf_config, torch.device("cpu")) == torch.float16  # asked for: given


@pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])  # GQA, head_dim 32 != hidden / heads; sliding windows
def test_triton_backend_greedy_matches_transformers(arch, references):
    """The Triton kernels serving whole requests (in Triton's interpreter without a GPU): prompts, decodes,
    a prefill over a prefix-cache hit, and chunks short enough to run as decode rows."""
    path, hf, prompts, greedy = references(arch)
    for kwargs in (dict(), dict(max_num_batched_tokens=8)):
        llm = LLM(path, dtype="float32", attention_backend="triton", **kwargs)
        assert llm.llm_engine.executor.worker.attention_backend.name == "triton"
        outs = _generate(llm, prompts)
        assert [o.outputs[0].token_ids for o in outs] == greedy, kwargs
        if not kwargs:
            # 32 tokens from the cache, 20 new ones: the prefill kernel over a cached prefix
            prompt = prompts[2][:32] + prompts[1][:20]
            out = _generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
            assert out.num_cached_tokens == 32
            assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, 3)


@pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
def test_decode_through_cuda_graph_buffers_matches_transformers(references):
    """Decode steps as CUDA graphs see them: inputs copied into static buffers, the batch padded up to a
    captured size with rows that write no KV, block tables as wide as max_model_len. On a CPU the forward
    runs eagerly at each 'replay'; the graphs themselves are tested on GPUs (tests/test_gpu.py)."""
    from shardserve.workers.cuda_graph import CudaGraphRunner
    path, _, prompts, greedy = references("qwen3")
    llm = LLM(path, dtype="float32", attention_backend="triton", max_model_len=128)
    worker = llm.llm_engine.executor.worker
    runner = CudaGraphRunner(worker.model, [2, 4], 128 // 16, 16, worker.device, use_graphs=False)
    worker.runner.graphs = runner
    outs = _generate(llm, prompts)  # 3 sequences decode as a padded batch of 4, then 2, then 1 -> 2
    assert [o.outputs[0].token_ids for o in outs] == greedy
    assert runner.num_replays >= NUM_TOKENS - 1
