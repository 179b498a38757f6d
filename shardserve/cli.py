"""The `shardserve` command: `serve` runs the online server on Ray Serve, `generate` offline generation."""
from __future__ import annotations

import argparse
import json
import os
import signal
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


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback clusters stay on loopback
    from ray import serve

    from shardserve.cluster.ray_cluster import connect, idle_bookkeeping
    from shardserve.models.gguf import default_generation_model
    from shardserve.models.source import default_embedding_model
    from shardserve.router.app import build_app
    from shardserve.router.spec import ModelSpec

    # The default app: SmolLM2 for completions and chat, all-MiniLM-L6-v2 for embeddings, both shipped in
    # PyPI packages (no hub).
    models = args.model or [default_generation_model(), default_embedding_model()]
    names = args.served_model_name or ([] if args.model else ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"])
    if len(names) > len(models):
        raise SystemExit("--served-model-name was given more times than there are models.")
    common = dict(tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                  tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                  enable_prompt_embeds=args.enable_prompt_embeds, chat_template=args.chat_template,
                  hf_overrides=json.loads(args.hf_overrides) if args.hf_overrides else {},
                  num_replicas=args.num_replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                  max_num_seqs=args.max_num_seqs, num_cpus=args.num_cpus, stream_interval=args.stream_interval,
                  stream_interval_s=args.stream_interval_s,
                  runner=args.runner, convert=args.convert, pooler_config=args.pooler_config, device=args.device,
                  gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
                  enforce_eager=args.enforce_eager)
    specs = [ModelSpec(model=m, served_model_name=names[i] if i < len(names) else None, **common)
             for i, m in enumerate(models)]
    connect(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(specs, args.api_key), name="shardserve", route_prefix="/", blocking=False)
    idle_bookkeeping()
    base = f"http://{args.host}:{args.port}"
    print(f"shardserve is listening on {base} (models: {', '.join(s.name for s in specs)})", flush=True)
    print(f"  curl {base}/v1/models", flush=True)
    print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' -d "
          f"'{{\"model\": \"{specs[0].name}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'",
          flush=True)
    embedders = [sp.name for sp in specs if sp.runner == "pooling" or sp.model == default_embedding_model()]
    if embedders:
        print(f"  curl {base}/v1/embeddings -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{embedders[0]}\", \"input\": [\"A sentence to embed\"]}}'", flush=True)
        print(f"  curl {base}/rerank -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{embedders[0]}\", \"query\": \"capital of France\", "
              f"\"documents\": [\"Paris is in France.\", \"Rome is in Italy.\"]}}'", flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d "
          f"'{{\"model\": \"{specs[0].name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'",
          flush=True)
    # SIGTERM (docker stop, Kubernetes, kill) stops the app as Ctrl-C does, rather than killing the driver
    # with requests in flight.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Shutting down.", file=sys.stderr)
        serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="serve models over OpenAI-compatible HTTP on Ray Serve")
    srv.add_argument("model", nargs="*", help="HF model directories, hub ids or .gguf files (default: SmolLM2)")
    srv.add_argument("--served-model-name", action="append", help="the API name of each model, in order")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tokenizer")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--max-model-len", type=int)
    srv.add_argument("--max-num-seqs", type=int, default=256)
    srv.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                     help="auto: cuda when the Ray cluster has GPUs")
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="the fraction of each GPU's memory the engine may use (weights, activations, KV cache)")
    srv.add_argument("--attention-backend", choices=["auto", "torch", "cpu", "triton", "flash_attn"])
    srv.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    srv.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    srv.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    srv.add_argument("--enable-prompt-embeds", action="store_true")
    srv.add_argument("--chat-template", help="a Jinja template, or a path to one")
    srv.add_argument("--hf-overrides", help="JSON object of config overrides")
    srv.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"])
    srv.add_argument("--convert", default="auto", choices=["auto", "embed", "classify", "reward"])
    srv.add_argument("--pooler-config", help="JSON object: pooling_type, normalize, dimensions, ...")
    srv.add_argument("--api-key", default=os.environ.get("SHARDSERVE_API_KEY"))
    srv.add_argument("--num-replicas", type=int, default=1)
    srv.add_argument("--min-replicas", type=int)
    srv.add_argument("--max-replicas", type=int)
    srv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves for each model replica")
    srv.add_argument("--stream-interval", type=int, default=1,
                     help="vLLM's: a streamed request gets a chunk every this many tokens (the first and the last "
                          "at once); larger values send fewer, larger chunks and leave more of the CPU to the model")
    srv.add_argument("--stream-interval-s", type=float, default=0.0,
                     help="send streamed tokens at most this often per request (fewer, larger chunks under load)")
    srv.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local one)")
    srv.set_defaults(func=_serve)
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
