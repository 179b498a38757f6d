"""A Triton kernel compiles once per compile key: its constexprs, and (Triton's specialisation) whether each
integer argument is 1 or a multiple of 16 and whether each pointer is 16-byte aligned, unless the kernel says
not to specialise on it. A compile stalls a step for about a second on a GPU, so nothing that changes from step
to step may reach a key: here the attention kernels' keys over a run of real steps (prefill chunks next to
decodes, batches growing and shrinking, contexts of every length, async scheduling's placeholders), recorded
from the Triton backend's launches in a child process without TRITON_INTERPRET (kernels recorded, not run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shardserve.layers.attention import triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.available(),
                                reason="needs triton (the test extra installs it on Linux x86-64)")


def _key(kernel, args, kwargs) -> str:
    import torch
    values = dict(zip(kernel.arg_names, args)) | kwargs
    key = []
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            key.append(value)
        elif isinstance(value, torch.Tensor):
            key.append(None if param.do_not_specialize_on_alignment or param.do_not_specialize
                       else value.data_ptr() % 16 == 0)
        elif isinstance(value, int) and not isinstance(value, bool):
            key.append(None if param.do_not_specialize else (value == 1, value % 16 == 0))
    return json.dumps(key)


def _record(model_dir: str) -> dict[str, list[str]]:
    """Each attention kernel's distinct compile keys over the steps of a mixed run."""
    import random

    import torch
    import triton
    from transformers import AutoConfig

    from shardserve import LLM, SamplingParams
    from shardserve.inputs import TokensPrompt
    from shardserve.layers.attention import triton_kernels
    from shardserve.layers.attention.triton_backend import TritonAttentionBackend

    llm = LLM(model=model_dir, dtype="float32", max_num_seqs=16, max_num_batched_tokens=96, max_model_len=512,
              async_scheduling=True)
    engine = llm.llm_engine
    runner = engine.executor.worker.runner
    steps = []
    prepare = runner._prepare

    def captured(scheduled):
        inputs = prepare(scheduled)
        steps.append(inputs)
        return inputs
    runner._prepare = captured
    rng = random.Random(0)
    for i in range(40):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=[rng.randrange(3, 200) for _ in range(
            rng.randint(5, 300))]), SamplingParams(temperature=0, ignore_eos=True, max_tokens=rng.randint(1, 40)))
    while engine.has_unfinished_requests():
        engine.step()

    keys: dict[str, set[str]] = {}
    for value in vars(triton_kernels).values():
        if isinstance(value, triton.runtime.JITFunction):
            value.run = lambda *args, grid, warmup, _kernel=value, **kwargs: keys.setdefault(
                _kernel.__name__, set()).add(_key(_kernel, args, kwargs))
    config = AutoConfig.from_pretrained(model_dir)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    backend = TritonAttentionBackend()
    cache = torch.zeros(2, 64, kv_heads, 16, head_dim)
    for input_ids, _, meta in steps:
        t = len(input_ids)
        q = torch.zeros(t, heads, head_dim)
        k, v = torch.zeros(t, kv_heads, head_dim), torch.zeros(t, kv_heads, head_dim)
        backend.forward(q, k, v, cache, meta, head_dim ** -0.5)
    return {"steps": len(steps), "mixed": sum(1 for _, _, m in steps if m.prefills and m.num_decode_tokens),
            **{name: sorted(found) for name, found in keys.items()}}


def test_no_step_to_step_value_reaches_a_kernels_compile_key(model_dirs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.dirname(os.path.abspath(__file__)),
                                                      env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__, model_dirs("llama")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["steps"] > 40 and found["mixed"] > 5, found   # the run had the shapes it is meant to
    assert len(found["_store_kv_kernel"]) == 1, found["_store_kv_kernel"]
    assert len(found["_paged_prefill_kernel"]) == 1, found["_paged_prefill_kernel"]
    # split or not: the decode kernel's one shape-driven variant (a batch too small to fill the device splits)
    assert len(found["_paged_decode_kernel"]) <= 2, found["_paged_decode_kernel"]


if __name__ == "__main__":
    print(json.dumps(_record(sys.argv[1])))
