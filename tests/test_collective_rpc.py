"""vLLM's calls into the workers: `LLM.collective_rpc`, `apply_model`, `reload_weights`, `load_model` after
`load_format="dummy"` and `worker_extension_cls`, in process and on Ray tensor-parallel workers; and `enqueue` /
`wait_for_completion`.

A weight update is proven by its outputs: an engine whose weights were replaced answers token for token and
log-probability for log-probability as an engine started on the new weights (CPU GEMMs run on packed copies of
the weights, which an update must reach), and a partial update as transformers does with the same tensors.
"""
from __future__ import annotations

import gzip
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_model_dir
from shardserve import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["The quick brown fox", "Hello, world! Streaming text one token at a time is how servers answer."]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=3)
ENGINE = dict(max_num_seqs=8, kv_cache_memory_bytes=1 << 26, seed=0)


@pytest.fixture(scope="module")
def second_weights(tmp_path_factory):
    """arch -> a model of the same shape as `model_dirs(arch)` with other random weights."""
    cache = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_model_dir(tmp_path_factory.mktemp(f"{arch}-seed1"), arch, seed=1)
        return cache[arch]
    return get


def assert_same(got, ref) -> None:
    for g, r in zip(got, ref):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        for gp, rp in zip(g.outputs[0].logprobs, r.outputs[0].logprobs):
            assert set(gp) == set(rp)
            for token_id, lp in rp.items():
                assert gp[token_id].logprob == pytest.approx(lp.logprob, abs=1e-4)


def generate_on(model_dir: str, **engine) -> list:
    llm = LLM(model_dir, **ENGINE, **engine)
    try:
        return llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_reload_weights_serves_the_new_weights(model_dirs, second_weights, arch):
    """`reload_weights` from a checkpoint folder, then from (name, tensor) pairs back to the first weights: each
    time the engine answers as one started on those weights. On this CPU the layers run on packed copies of
    their weights (oneDNN's layout; a mixture of experts' experts rewritten in the C kernel's), so without the
    update reaching them the answers would stay the old weights'."""
    first, second = model_dirs(arch), second_weights(arch)
    expected_second = generate_on(second)
    llm = LLM(first, **ENGINE)
    expected_first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert expected_first[0].outputs[0].token_ids != expected_second[0].outputs[0].token_ids

    assert llm.collective_rpc("reload_weights", kwargs={"weights_path": second}) == [None]
    llm.reset_prefix_cache()  # its KV was computed with the old weights
    assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected_second)

    tensors = list(load_file(f"{first}/model.safetensors").items())
    llm.collective_rpc("reload_weights", args=(tensors,))
    llm.reset_prefix_cache()
    assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected_first)
    llm.shutdown()


def test_dummy_weights_then_load_model(model_dirs, tmp_path):
    """vLLM's load_format="dummy" starts on random weights (nothing read from the checkpoint); then
    `collective_rpc("load_model")` reads the checkpoint in place and the engine answers as one started on it.
    "pt" reads a folder's .bin files (`weights_only=True`); a format the folder does not have is refused."""
    first = model_dirs("llama")
    expected = generate_on(first)
    llm = LLM(first, load_format="dummy", **ENGINE)
    norms = llm.apply_model(lambda m: float(m.lm_head.weight.abs().max()))
    assert 0 < norms[0] <= 1e-3
    llm.collective_rpc("load_model")
    llm.reset_prefix_cache()
    assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    llm.shutdown()

    as_bin = tmp_path / "bin"
    shutil.copytree(first, as_bin, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(f"{first}/model.safetensors"), as_bin / "pytorch_model.bin")
    assert_same(generate_on(str(as_bin), load_format="pt"), expected)
    with pytest.raises(ValueError, match=r"No weights \(\*.safetensors\)"):
        LLM(str(as_bin), load_format="safetensors", **ENGINE)
    with pytest.raises(ValueError, match="not a GGUF file"):
        LLM(first, load_format="gguf", **ENGINE)
    with pytest.raises(ValueError, match="load_format 'tensorizer' is not supported"):
        LLM(first, load_format="tensorizer", **ENGINE)


def test_apply_model_updates_part_of_the_weights(model_dirs, second_weights):
    """`model.load_weights` in `apply_model` with some of the checkpoint's tensors (a trainer's update sends
    what changed): the engine answers as transformers does with those tensors swapped into its model."""
    first, second = model_dirs("llama"), second_weights("llama")
    swapped = {name: t for name, t in load_file(f"{second}/model.safetensors").items()
               if name in ("lm_head.weight", "model.layers.1.self_attn.k_proj.weight",
                           "model.layers.0.mlp.up_proj.weight")}
    llm = LLM(first, **ENGINE)
    loaded = llm.apply_model(lambda model: sorted(model.load_weights(swapped.items())))
    assert loaded == [sorted(["lm_head.weight", "model.layers.1.self_attn.qkv_proj.weight",
                              "model.layers.0.mlp.gate_up_proj.weight"])]
    got = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
    llm.shutdown()

    hf = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    hf.load_state_dict(swapped, strict=False)
    tokenizer = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, got):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, ids.size(1):].tolist()


def test_collective_rpc_calls_and_errors(model_dirs, caplog):
    """A function of the worker with args and kwargs; a worker method by name; a method that raises (its
    error, and the engine serves on); a name the worker lacks; the world size; sleep on a CPU (a no-op)."""
    llm = LLM(model_dirs("llama"), **ENGINE)
    before = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.collective_rpc(lambda worker, a, b=0: (worker.rank, a + b), args=(1,), kwargs={"b": 2}) == [(0, 3)]
    assert llm.collective_rpc("num_parameter_elements") == [sum(p.numel() for p in
                                                               llm.apply_model(lambda m: list(m.parameters()))[0])]
    with pytest.raises(ZeroDivisionError):
        llm.collective_rpc(lambda worker: 1 / 0)
    with pytest.raises(AttributeError, match="no_such_method"):
        llm.collective_rpc("no_such_method")
    with pytest.raises(ValueError, match="not both"):
        llm.collective_rpc("reload_weights", kwargs={"weights_path": "x", "weights_iterator": []})
    assert llm.get_world_size() == 1 and llm.get_world_size(include_dp=False) == 1
    llm.sleep(level=1)  # vLLM's CPU backend: a warning, nothing freed
    llm.wake_up()
    assert not llm.is_sleeping() and llm.reset_prefix_cache(reset_running_requests=True, reset_connector=False)
    assert "sleep mode is not supported" in caplog.text
    assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), before)
    llm.shutdown()


def test_collective_rpc_on_tensor_parallel_ray_workers(ray_cluster, model_dirs, second_weights):
    """TP = 2 on Ray actors: each rank reports its own shard, a reload from a checkpoint gives TP = 1's answers
    on the new weights (each rank copies its slice), a method's error comes back as its own class with the
    replica serving on, and a call past its timeout raises TimeoutError."""
    first, second = model_dirs("llama"), second_weights("llama")
    expected_second = generate_on(second)
    llm = LLM(first, tensor_parallel_size=2, num_cpus_per_worker=0.5, **ENGINE)
    try:
        assert llm.get_world_size() == 2
        shapes = llm.apply_model(lambda m: tuple(m.model.layers[0].self_attn.qkv_proj.weight.shape))
        assert shapes == [(64, 64), (64, 64)]  # (4 query + 2 x 2 KV heads of 16) / 2 ranks
        assert [r for r, _ in llm.collective_rpc(lambda w: (w.rank, None))] == [0, 1]

        llm.collective_rpc("reload_weights", kwargs={"weights_path": second})
        llm.reset_prefix_cache()
        assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected_second)

        with pytest.raises(KeyError):
            llm.collective_rpc(lambda w: {}["missing"])
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="within 0.5 s"):
            llm.collective_rpc(lambda w: time.sleep(3), timeout=0.5)
        assert time.monotonic() - start < 2.5
        assert_same(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected_second)  # after the sleeps
    finally:
        llm.shutdown()


class WeightProbe:
    """A worker extension (vLLM's worker_extension_cls): methods every worker gains."""

    def weight_sum(self, name: str) -> float:
        return float(dict(self.model.named_parameters())[name].sum())


class ShadowingExtension:
    def get_model(self):
        return None


def test_worker_extension_cls(model_dirs):
    llm = LLM(model_dirs("llama"), worker_extension_cls=f"{__name__}.WeightProbe", **ENGINE)
    expected = float(load_file(f"{model_dirs('llama')}/model.safetensors")["lm_head.weight"].sum())
    assert llm.collective_rpc("weight_sum", args=("lm_head.weight",)) == [pytest.approx(expected, rel=1e-5)]
    llm.shutdown()
    with pytest.raises(ValueError, match="get_model"):
        LLM(model_dirs("llama"), worker_extension_cls=f"{__name__}.ShadowingExtension", **ENGINE)
    with pytest.raises(ValueError, match="not an importable class"):
        LLM(model_dirs("llama"), worker_extension_cls="no_such_module.Probe", **ENGINE)


def test_enqueue_then_wait_for_completion(model_dirs):
    """Prompts queued in two calls, a `generate` between them (which runs the queued ones too), then
    `wait_for_completion`: every queued output, in queue order, as one `generate` of them all gives; a bad
    prompt in a batch queues none of it."""
    llm = LLM(model_dirs("llama"), **ENGINE)
    prompts = PROMPTS + ["def add(a, b):\n    return"]
    expected = llm.generate(prompts, GREEDY, use_tqdm=False)
    ids = llm.enqueue(prompts[:2], GREEDY, use_tqdm=False)
    assert len(ids) == 2 and llm.llm_engine.get_num_unfinished_requests() == 2
    between = llm.generate(prompts[2], GREEDY, use_tqdm=False)
    assert_same(between, expected[2:])
    with pytest.raises(ValueError):
        llm.enqueue(["fine", {"prompt_token_ids": [10**6]}], GREEDY)
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    ids += llm.enqueue(prompts[2], GREEDY)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == ids
    assert_same(outputs, expected)
    assert llm.wait_for_completion(use_tqdm=False) == []
    llm.shutdown()


def _trace_events(path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_start_and_stop_profile(model_dirs, tmp_path):
    """vLLM's profiler_config: the steps between start_profile and stop_profile recorded into a gzipped Chrome
    trace named after the prefix, stage and rank; with max_iterations the recording ends by itself after that
    many steps (fewer events than the whole call); without a config start_profile says how to enable it."""
    traces = {}
    for name, bounds in (("whole", {}), ("limited", {"delay_iterations": 1, "max_iterations": 2})):
        folder = tmp_path / name
        llm = LLM(model_dirs("llama"), profiler_config={"profiler": "torch", "torch_profiler_dir": str(folder),
                                                        "torch_profiler_with_stack": False}, **ENGINE)
        llm.start_profile(name, **bounds)
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        pattern = f"{name}_pp0_tp0.*.pt.trace.json.gz"
        assert len(list(folder.glob(pattern))) == (name == "limited")  # that one ended by itself
        llm.stop_profile()
        traces[name] = list(folder.glob(pattern))
        assert len(traces[name]) == 1
        with pytest.raises(ValueError, match="max_iterations"):
            llm.start_profile(max_iterations=-1)
        llm.shutdown()
    whole, limited = (_trace_events(traces[name][0]) for name in ("whole", "limited"))
    assert any(e.get("name", "").startswith("aten::") for e in whole)
    assert 0 < len(limited) < len(whole)

    llm = LLM(model_dirs("llama"), **ENGINE)
    with pytest.raises(RuntimeError, match="profiler_config"):
        llm.start_profile()
    llm.shutdown()
    with pytest.raises(ValueError, match="torch_profiler_dir"):
        LLM(model_dirs("llama"), profiler_config={"profiler": "torch"}, **ENGINE)
    with pytest.raises(ValueError, match="'proton' is not available"):
        LLM(model_dirs("llama"), profiler_config={"profiler": "proton", "torch_profiler_dir": "x"}, **ENGINE)
