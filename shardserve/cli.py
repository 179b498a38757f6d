"""The `shardserve` command. `generate` runs offline generation; `serve` arrives with the online server."""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = ["The capital of France is", "The three primary colors are", "def fibonacci(n):"]


def _generate(args: argparse.Namespace) -> int:
    from shardserve import LLM, SamplingParams
    from shardserve.models.gguf import default_generation_model

    model = args.model or default_generation_model()
    print(f"Loading {model}", file=sys.stderr)
    llm = LLM(model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
              seed=args.seed)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed if args.temperature > 0 else None)
    prompts = args.prompt or DEFAULT_PROMPTS
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed:.2f}s "
          f"({num_tokens / elapsed:.1f} output tokens/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline generation (default model: SmolLM2-135M-Instruct GGUF)")
    gen.add_argument("--model", help="HF model directory, hub id or .gguf file")
    gen.add_argument("--tokenizer")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.set_defaults(func=_generate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
