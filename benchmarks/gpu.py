#!/usr/bin/env python
"""GPU generation benchmark (issue 8): shardserve against transformers on one GPU, in the same run.

For each model shape (random bf16 weights, a WordLevel tokenizer, built once under /tmp/shardserve-bench):
  - the memory-bandwidth floor of a decode step: the bytes a step must read (every weight, except an input
    embedding table that is only gathered) over the device's measured copy bandwidth;
  - batch-1 time per output token: (time of 128 output tokens - time of 1) / 127, so prefill is not in it;
  - throughput at --batch concurrent requests of 128 prompt + 128 output tokens (ignore_eos): shardserve
    `LLM.generate` against transformers `generate` at the same batch;
  - a ShareGPT-like mix (shardserve only: transformers has no continuous batching to compare; on the
    --mix-models shapes): --num-requests requests with prompt and output lengths uniform in 100..1024, all
    queued at once, stepped through the engine with a timestamp per token: output and total tokens/s, TTFT
    and ITL percentiles.
Every measurement runs in its own subprocess (GPU memory is released between peers; one that outlives
--worker-timeout is stopped and reported) and prints one RESULT_TAG line of JSON; the driver prints each
shape's results as they come and the tables at the end (--json-out is rewritten after each shape, so a run
cut short keeps what it measured).

  .venv/bin/python benchmarks/gpu.py                      # both shapes, on the GPU
  .venv/bin/python benchmarks/gpu.py --smoke              # the whole flow at toy sizes on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (CACHE_DIR, REPO_ROOT, RESULT_TAG, finish_worker, save_model_dir,  # noqa: E402
                        worker_error)

SHAPES = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "tiny": ("LlamaConfig", dict(  # --smoke
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, tie_word_embeddings=False)),
}
INPUT_LEN = OUTPUT_LEN = 128


# ----------------------------------------------------------------------------- model

def build_model(shape: str, dtype: str) -> Path:
    out = CACHE_DIR / f"{shape}-{dtype}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config_cls, fields = SHAPES[shape]
    config = getattr(transformers, config_cls)(**fields, max_position_embeddings=4096, bos_token_id=1,
                                               eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU's random init takes no time
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     pad_token="<unk>")
    return save_model_dir(out, model, hf_tok)


def random_prompts(vocab: int, count: int, lens: list[int] | int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [lens] * count if isinstance(lens, int) else lens
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


# ----------------------------------------------------------------------------- workers (subprocesses)

def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def work_bandwidth(a) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second), best of several copies."""
    import torch
    n = (1 << 30) // 4 if a.device == "cuda" else (256 << 20) // 4
    src = torch.ones(n, device=a.device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(12):
        _sync(a.device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(a.device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return {"bandwidth_gbs": 2 * n * 4 / best / 1e9,
            "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}


def _tpot(generate_one) -> float:
    """ms per output token of a batch-1 decode: 128 tokens minus 1 token, over the 127 decode steps."""
    generate_one(OUTPUT_LEN)  # warm-up (and CUDA graphs / kernels compiled)
    times = {}
    for n in (1, OUTPUT_LEN):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            generate_one(n)
            runs.append(time.perf_counter() - start)
        times[n] = min(runs)
    return (times[OUTPUT_LEN] - times[1]) / (OUTPUT_LEN - 1) * 1e3


def work_shardserve(a, async_scheduling: bool | None = None) -> dict:
    from shardserve import LLM, SamplingParams
    from shardserve.inputs import TokensPrompt
    llm = LLM(model=a.model, dtype=a.dtype, max_num_seqs=a.batch, max_model_len=2048 + 64, seed=0,
              enforce_eager=a.enforce_eager, gpu_memory_utilization=0.85,
              max_num_batched_tokens=max(4096, a.batch * 16), async_scheduling=async_scheduling)
    vocab = llm.llm_engine.source.hf_config.vocab_size

    def generate(prompts, max_tokens) -> int:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    single = random_prompts(vocab, 1, INPUT_LEN, seed=1)
    res = {"tpot_ms": _tpot(lambda n: generate(single, n))}
    generate(random_prompts(vocab, a.batch, INPUT_LEN, seed=2), 16)  # warm-up at the batch size
    start = time.perf_counter()
    n = generate(random_prompts(vocab, a.batch, INPUT_LEN, seed=3), OUTPUT_LEN)
    res["tok_s"] = n / (time.perf_counter() - start)
    if a.mix:
        res["mix"] = _mix(llm, vocab, a)
    worker = getattr(llm.llm_engine.executor, "worker", None)
    if worker is not None:
        res["attention_backend"] = worker.attention_backend.name
        res["cuda_graphs"] = worker.runner.graphs is not None
    res["async_scheduling"] = llm.llm_engine.async_scheduling
    from shardserve.layers import gemv
    res["gemv"] = gemv.ENABLED
    return res


def _mix(llm, vocab: int, a) -> dict:
    """All requests queued at once, the engine stepped directly: a timestamp for every token. Outputs are streamed
    as the server streams them (DELTA: each step's new tokens of every request)."""
    from shardserve import SamplingParams
    from shardserve.sampling_params import RequestOutputKind
    from shardserve.inputs import TokensPrompt
    rng = random.Random(4)
    lo, hi = a.mix_lens
    in_lens = [rng.randint(lo, hi) for _ in range(a.num_requests)]
    out_lens = [rng.randint(lo, hi) for _ in range(a.num_requests)]
    engine = llm.llm_engine
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(random_prompts(vocab, a.num_requests, in_lens, seed=5), out_lens)):
        engine.add_request(f"mix-{i}", TokensPrompt(prompt_token_ids=prompt),
                           SamplingParams(temperature=0, ignore_eos=True, max_tokens=n,
                                          output_kind=RequestOutputKind.DELTA))
    stamps: dict[str, list[float]] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            stamps.setdefault(out.request_id, []).extend([now] * sum(len(c.token_ids) for c in out.outputs))
    elapsed = time.perf_counter() - start
    ttft = sorted(s[0] - start for s in stamps.values())
    itl = sorted(b - a_ for s in stamps.values() for a_, b in zip(s, s[1:]))

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3

    return {"requests": a.num_requests, "seconds": elapsed, "output_tok_s": sum(out_lens) / elapsed,
            "total_tok_s": (sum(in_lens) + sum(out_lens)) / elapsed,
            **{f"ttft_p{q}_ms": pct(ttft, q / 100) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": pct(itl, q / 100) for q in (50, 90, 99)}}


def work_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    vocab = model.config.vocab_size
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    # An untied input embedding is gathered a row per token, not read whole.
    step_bytes = weight_bytes - (0 if tied else embed.numel() * embed.element_size())

    @torch.inference_mode()
    def generate(prompts, max_tokens) -> int:
        ids = torch.tensor(prompts, device=a.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
        _sync(a.device)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    single = random_prompts(vocab, 1, INPUT_LEN, seed=1)
    res = {"tpot_ms": _tpot(lambda n: generate(single, n)), "step_bytes": step_bytes}
    generate(random_prompts(vocab, a.batch, INPUT_LEN, seed=2), 16)
    start = time.perf_counter()
    n = generate(random_prompts(vocab, a.batch, INPUT_LEN, seed=3), OUTPUT_LEN)
    res["tok_s"] = n / (time.perf_counter() - start)
    return res


WORKERS = {"bandwidth": work_bandwidth, "shardserve": work_shardserve, "transformers": work_transformers,
           # the same engine reading each step's tokens before scheduling the next: what async scheduling gains
           "shardserve-sync": lambda a: work_shardserve(a, async_scheduling=False),
           # the same engine with decode steps of a few rows through layers/gemv.py (the driver sets its variable)
           "shardserve-gemv": work_shardserve}
VARIANTS = {"shardserve-sync": "step by step (async_scheduling=False)",
            "shardserve-gemv": "the GEMV kernel at a few rows (SHARDSERVE_GEMV=1)"}


def worker_main(a) -> None:
    try:
        res = WORKERS[a.worker](a)
    except Exception as e:  # report and let the driver go on with the next measurement
        res = worker_error(e)
    finish_worker(res)


# ----------------------------------------------------------------------------- driver

def run_worker(name: str, a, model: Path | None = None, mix: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--device", a.device, "--dtype", a.dtype,
           "--batch", str(a.batch), "--num-requests", str(a.num_requests),
           "--mix-lens", *map(str, a.mix_lens)] + (["--model", str(model)] if model else [])
    if a.enforce_eager:
        cmd.append("--enforce-eager")
    if mix:
        cmd.append("--mix")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if a.attention_backend:
        env["SHARDSERVE_ATTENTION_BACKEND"] = a.attention_backend
    if name == "shardserve-gemv":
        env["SHARDSERVE_GEMV"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.worker_timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"stopped after --worker-timeout {a.worker_timeout} s: {str(e.stderr or '')[-400:]}"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}"}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    p.add_argument("--peers", default="shardserve,transformers",
                   help="comma list of shardserve, shardserve-sync (no async scheduling), shardserve-gemv "
                        "(SHARDSERVE_GEMV=1), transformers")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--mix-lens", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--mix-models", default="qwen3-0.6b", help="the shapes the mix runs on (comma list, or all)")
    p.add_argument("--worker-timeout", type=float, default=300, help="seconds one measurement may take")
    p.add_argument("--mix", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attention-backend", help="sets SHARDSERVE_ATTENTION_BACKEND for shardserve")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--smoke", action="store_true", help="toy sizes on a CPU: checks the script, not speed")
    p.add_argument("--json-out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker_main(a)
    if a.smoke:
        a.models, a.device, a.dtype, a.batch, a.num_requests, a.mix_lens = "tiny", "cpu", "float32", 8, 8, [8, 32]
        a.mix_models = "tiny"
    peers = a.peers.split(",")
    bandwidth = run_worker("bandwidth", a)
    print(f"device: {bandwidth.get('device_name', '?')}; copy bandwidth "
          f"{fmt(bandwidth.get('bandwidth_gbs'), '.0f')} GB/s", flush=True)
    results = {"bandwidth": bandwidth, "models": {}}
    for shape in a.models.split(","):
        model = build_model(shape, a.dtype)
        results["models"][shape] = {}
        for peer in peers:
            mix = peer == "shardserve" and (a.mix_models == "all" or shape in a.mix_models.split(","))
            res = results["models"][shape][peer] = run_worker(peer, a, model, mix)
            print(f"{shape} {peer}: {json.dumps(res)}", flush=True)
            if a.json_out:
                Path(a.json_out).write_text(json.dumps(results, indent=2))

    bw = bandwidth.get("bandwidth_gbs")
    print(f"\n| model | floor ms/tok | ours ms/tok | transformers ms/tok | ours / floor | ours tok/s @{a.batch} "
          f"| transformers tok/s @{a.batch} | ours / transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, res in results["models"].items():
        ours, hf = res.get("shardserve", {}), res.get("transformers", {})
        floor = hf["step_bytes"] / (bw * 1e9) * 1e3 if bw and "step_bytes" in hf else None
        ratio = ours["tok_s"] / hf["tok_s"] if "tok_s" in ours and "tok_s" in hf else None
        over_floor = ours["tpot_ms"] / floor if floor and "tpot_ms" in ours else None
        print(f"| {shape} | {fmt(floor, '.3f')} | {fmt(ours.get('tpot_ms'), '.3f')} | "
              f"{fmt(hf.get('tpot_ms'), '.3f')} | {fmt(over_floor, '.2f')} | {fmt(ours.get('tok_s'), ',.0f')} | "
              f"{fmt(hf.get('tok_s'), ',.0f')} | {fmt(ratio, '.2f')} |")
    for variant, what in VARIANTS.items():
        if not any(variant in res for res in results["models"].values()):
            continue
        print(f"\nThe engine as it runs by default against {what}:")
        print(f"| model | ms/tok default | ms/tok {variant} | tok/s @{a.batch} default | tok/s {variant} |")
        print("| --- | --- | --- | --- | --- |")
        for shape, res in results["models"].items():
            ours, other = res.get("shardserve", {}), res.get(variant, {})
            print(f"| {shape} | {fmt(ours.get('tpot_ms'), '.3f')} | {fmt(other.get('tpot_ms'), '.3f')} | "
                  f"{fmt(ours.get('tok_s'), ',.0f')} | {fmt(other.get('tok_s'), ',.0f')} |")
    print(f"\nShareGPT-like mix ({a.num_requests} requests, {a.mix_lens[0]}-{a.mix_lens[1]} in and out), shardserve:")
    print("| model | output tok/s | total tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for shape, res in results["models"].items():
        mix = res.get("shardserve", {}).get("mix")
        if mix:
            print(f"| {shape} | {mix['output_tok_s']:,.0f} | {mix['total_tok_s']:,.0f} | "
                  f"{mix['ttft_p50_ms']:.0f} / {mix['ttft_p90_ms']:.0f} / {mix['ttft_p99_ms']:.0f} | "
                  f"{mix['itl_p50_ms']:.1f} / {mix['itl_p90_ms']:.1f} / {mix['itl_p99_ms']:.1f} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
