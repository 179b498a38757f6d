"""The `shardserve` command: `serve` runs the online server on Ray Serve, `generate` offline generation."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardserve.router.spec import ModelSpec

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


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """One `ModelSpec` per model on the command line: the flags that name a spec field (absent ones keep the
    spec's defaults, the only defaults there are) apply to every model."""
    from shardserve.models.gguf import default_generation_model
    from shardserve.models.source import default_embedding_model
    from shardserve.router.spec import ModelSpec

    # The default app: SmolLM2 for completions and chat, all-MiniLM-L6-v2 for embeddings, both shipped in
    # PyPI packages (no hub).
    models = args.model or [default_generation_model(), default_embedding_model()]
    names = args.served_model_name or ([] if args.model else ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"])
    if len(names) > len(models):
        raise SystemExit("--served-model-name was given more times than there are models.")
    common = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelSpec)
              if f.name not in ("model", "served_model_name") and hasattr(args, f.name)}
    return [ModelSpec(model=m, served_model_name=names[i] if i < len(names) else None, **common)
            for i, m in enumerate(models)]


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback clusters stay on loopback
    import ray
    from ray import serve

    from shardserve.cluster.ray_cluster import connect, haproxy_configs, idle_bookkeeping, shutdown_serve
    from shardserve.models.source import default_embedding_model
    from shardserve.router.app import build_app
    from shardserve.router.ingress import CORSOptions

    try:
        specs = model_specs(args)
    except (TypeError, ValueError) as e:  # a flag the engine refuses: said before a cluster starts
        raise SystemExit(f"shardserve serve: error: {e}") from None
    connect(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    cors = CORSOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CORSOptions) if f.name in args})
    serve.run(build_app(specs, args.api_key, cors), name="shardserve", route_prefix="/", blocking=False)
    idle_bookkeeping()
    haproxy = haproxy_configs()
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
        shutdown_serve(haproxy)
        # Ray's exit, bounded: where the signal reached the cluster's processes too (a process-group Ctrl-C, a
        # service manager's stop), it would wait on processes that are gone
        stopping = threading.Thread(target=ray.shutdown, daemon=True)
        stopping.start()
        stopping.join(10)
        sys.stderr.flush()
        os._exit(0)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _spec_flag(group, *flags: str, help: str | None = None, **kwargs) -> None:
    """A flag for the ModelSpec field of its name; its help ends with the field's default (the only one)."""
    from shardserve.router.spec import ModelSpec

    field = next(f for f in dataclasses.fields(ModelSpec) if f.name == flags[0][2:].replace("-", "_"))
    if all(field.default is not v for v in (None, False, dataclasses.MISSING)) and "default" not in (help or ""):
        help = f"{help} (default: {field.default})" if help else f"default: {field.default}"
    group.add_argument(*flags, help=help, **kwargs)


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def _compilation_config(text: str) -> int | dict:
    """vLLM's --compilation-config: an integer (the compilation mode) or a JSON object."""
    return int(text) if text.strip().lstrip("-").isdigit() else _json_object(text)


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    from shardserve.engine.reasoning import REASONING_PARSERS
    from shardserve.config import LOAD_FORMATS
    from shardserve.entrypoints.chat_utils import CONTENT_FORMATS
    from shardserve.layers.attention.backend import BACKENDS, backend_name
    from shardserve.router.tool_calls import TOOL_CALL_PARSERS

    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Flags named after a ModelSpec field and left out keep the spec's default (argument_default).
    srv = sub.add_parser("serve", help="serve models over OpenAI-compatible HTTP on Ray Serve",
                         argument_default=argparse.SUPPRESS)
    srv.add_argument("model", nargs="*", default=[], help="HF model directories, hub ids or .gguf files "
                                                          "(default: SmolLM2 and all-MiniLM-L6-v2)")
    srv.add_argument("--served-model-name", action="append", default=None,
                     help="the API name of each model, in order")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("SHARDSERVE_API_KEY"))
    # vLLM's CORS flags (the ingress's CORSOptions); left out, any web page may call the API, as in vLLM
    srv.add_argument("--allowed-origins", type=_json_list, help='JSON list of origins, e.g. \'["https://a.example"]\' '
                                                              '(default: ["*"])')
    srv.add_argument("--allowed-credentials", action="store_true", help="let browsers send cookies and credentials")
    srv.add_argument("--allowed-methods", type=_json_list, help='JSON list of HTTP methods (default: ["*"])')
    srv.add_argument("--allowed-headers", type=_json_list, help='JSON list of request headers (default: ["*"])')
    srv.add_argument("--address", default=None,
                     help="an existing Ray cluster (default: RAY_ADDRESS, else a local one)")
    model = srv.add_argument_group("the model and its engine (vLLM's flags)")
    _spec_flag(model, "--tokenizer")
    _spec_flag(model, "--revision")
    _spec_flag(model, "--trust-remote-code", action="store_true")
    _spec_flag(model, "--dtype", help="auto, float32, bfloat16 or float16")
    _spec_flag(model, "--hf-overrides", type=_json_object, help="JSON object of config overrides")
    _spec_flag(model, "--seed", type=int)
    _spec_flag(model, "--generation-config",
               help="sampling defaults for what a request leaves out: auto, the model's generation_config.json; "
                    "vllm, none; or a folder holding one (default: auto)")
    _spec_flag(model, "--override-generation-config", type=_json_object,
               help="JSON object of generation-config fields over those, e.g. '{\"temperature\": 0.5}'")
    _spec_flag(model, "--max-logprobs", type=int, help="the most logprobs one request may ask for; -1: no cap")
    _spec_flag(model, "--structured-outputs-config", type=_json_object,
               help="JSON object, as vLLM's: backend (auto or xgrammar), disable_any_whitespace (JSON outputs "
                    "without whitespace between items, for every request) and enable_in_reasoning (constrain a "
                    "reasoning model's thinking too)")
    _spec_flag(model, "--max-model-len", type=int, help="default: the model's")
    _spec_flag(model, "--max-num-seqs", type=int, help="most requests in one step")
    _spec_flag(model, "--max-num-batched-tokens", type=int,
               help="most tokens in one step; longer prompts are prefilled in chunks (default: max_model_len, "
                    "at least 2048). Smaller: a burst of prompts gets its first tokens sooner, and the streams "
                    "already running wait through more, shorter prefill steps (benchmarks/RESULTS.md)")
    _spec_flag(model, "--scheduling-policy", choices=["fcfs", "priority"],
               help="fcfs: in arrival order; priority: by each request's `priority` (lower first; arrival breaks "
                    "ties), preempting the least urgent when the KV cache is full")
    _spec_flag(model, "--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
               help="prefill a prompt longer than what is left of a step's budget in chunks (default: on); off, it "
                    "waits for a step with room for all of it, and the budget must hold max_model_len")
    _spec_flag(model, "--block-size", type=int, help="tokens per KV-cache block")
    _spec_flag(model, "--kv-cache-dtype", help="auto: the model's dtype, in which the KV cache is kept (no fp8 cache)")
    _spec_flag(model, "--quantization", "-q", help="gguf for a GGUF file (dequantized at load); no other scheme")
    _spec_flag(model, "--tokenizer-mode", help="auto or hf: the model's Hugging Face fast tokenizer")
    _spec_flag(model, "--load-format", choices=list(LOAD_FORMATS),
               help="auto: the folder's safetensors, else its .bin files, or the GGUF file; dummy: random weights "
                    "(to measure serving without a checkpoint's)")
    _spec_flag(model, "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
               help="reuse the KV blocks of a shared prompt prefix (default: on)")
    _spec_flag(model, "--kv-cache-memory-bytes", type=int,
               help="the KV cache's size on a CPU (default: SHARDSERVE_CPU_KVCACHE_SPACE GiB, else 4 GiB)")
    _spec_flag(model, "--device", choices=["auto", "cuda", "cpu"], help="auto: cuda when the Ray cluster has GPUs")
    _spec_flag(model, "--gpu-memory-utilization", type=float,
               help="the fraction of each GPU's memory the engine may use: weights, activations, KV cache")
    _spec_flag(model, "--attention-backend", type=backend_name, choices=BACKENDS,
               help="(or vLLM's name of one: TRITON_ATTN, FLASH_ATTN, CPU_ATTN, TORCH_SDPA)")
    _spec_flag(model, "--attention-config", "-ac", type=_json_object,
               help="vLLM's, as a JSON object: its backend (the same as --attention-backend)")
    _spec_flag(model, "--enforce-eager", action="store_true", help="no CUDA graphs")
    _spec_flag(model, "--async-scheduling", action=argparse.BooleanOptionalAction,
               help="schedule the next step while the one in flight runs on the device (default: on a GPU)")
    _spec_flag(model, "--cudagraph-capture-sizes", type=int, nargs="+",
               help="decode batch sizes to capture (default: 1, 2, 4, 8, then multiples of 16 up to max_num_seqs, "
                    "or --max-cudagraph-capture-size)")
    _spec_flag(model, "--cuda-graph-sizes", type=int, nargs="+", help="vLLM's older name of --cudagraph-capture-sizes")
    _spec_flag(model, "--max-cudagraph-capture-size", type=int,
               help="the largest decode batch the default sizes capture (0: no graphs)")
    _spec_flag(model, "--compilation-config", "-cc", type=_compilation_config,
               help="vLLM's: its mode (an integer) or a JSON object of its fields. shardserve runs no torch.compile; "
                    "it reads cudagraph_mode (NONE: no graphs; the others: decode steps captured whole), "
                    "cudagraph_capture_sizes and max_cudagraph_capture_size")
    _spec_flag(model, "--optimization-level", "-O", type=int, choices=range(4),
               help="vLLM's -O0 .. -O3: 0 runs without CUDA graphs, as --enforce-eager")
    _spec_flag(model, "--tensor-parallel-size", "-tp", type=int)
    _spec_flag(model, "--pipeline-parallel-size", "-pp", type=int)
    _spec_flag(model, "--enable-prompt-embeds", action="store_true")
    _spec_flag(model, "--chat-template", help="a Jinja template, or a path to one")
    _spec_flag(model, "--chat-template-content-format", choices=list(CONTENT_FORMATS),
               help="how a message's content parts reach the template: string (joined), openai (the list of "
                    "parts), auto (as the template reads them)")
    _spec_flag(model, "--enable-prompt-tokens-details", action="store_true",
               help="usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served")
    _spec_flag(model, "--enable-auto-tool-choice", action="store_true",
               help="chat's tool_choice \"auto\" (the default where a request has tools): the model may call tools "
                    "in its own format, which --tool-call-parser reads into tool_calls")
    _spec_flag(model, "--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS),
               help="the model family's tool-call format: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen2.5, "
                    "Qwen3, ...), llama3_json / llama4_json (JSON objects with name and parameters: Llama 3.x, 4), "
                    "pythonic / llama4_pythonic (a Python list of calls: Llama 3.2, Llama 4)")
    _spec_flag(model, "--tool-strict-level", choices=["auto", "function", "parameter"],
               help="where a parser's format is a structural tag (hermes, llama3_json, llama4_json) and "
                    "VLLM_ENFORCE_STRICT_TOOL_CALLING is on (the default), forced calls are written in it; tool_choice "
                    "auto is held to it for tools marked strict (auto), for every request with tools (function), "
                    "with every tool's arguments held to its schema too (parameter)")
    _spec_flag(model, "--enable-lora", action="store_true",
               help="requests may run through LoRA adapters: those of --lora-modules, each served under its name")
    _spec_flag(model, "--lora-modules", nargs="+", metavar="NAME=PATH",
               help="PEFT LoRA adapters to serve, as name=path or JSON {\"name\": ..., \"path\": ...}; a request "
                    "whose `model` is the name runs through the adapter")
    _spec_flag(model, "--max-loras", type=int, help="adapters that run at once (a request of another waits)")
    _spec_flag(model, "--max-cpu-loras", type=int,
               help="adapters each worker keeps loaded (at least --max-loras, its default): more are read from disk "
                    "again when their requests come back")
    _spec_flag(model, "--max-lora-rank", type=int, help="the highest adapter rank accepted")
    _spec_flag(model, "--reasoning-parser", choices=sorted(REASONING_PARSERS),
               help="the model family's thinking tags: deepseek_r1 (DeepSeek-R1), qwen3 (Qwen3: off with "
                    "chat_template_kwargs enable_thinking=false), deepseek_v3 (DeepSeek-V3.1: on with thinking=true). "
                    "Chat answers then carry the thinking as `reasoning`, and structured outputs hold only the answer")
    _spec_flag(model, "--runner", choices=["auto", "generate", "pooling"])
    _spec_flag(model, "--convert", choices=["auto", "embed", "classify", "reward"])
    _spec_flag(model, "--pooler-config", help="JSON object: pooling_type, normalize, dimensions, ...")
    _spec_flag(model, "--speculative-config", type=_json_object,
               help="vLLM's, as JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                    "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} drafts up to 4 tokens a step from the "
                    "request's own text where its last tokens occurred before; the model checks them in the same step")
    _spec_flag(model, "--stream-interval", type=int,
               help="vLLM's: a streamed request gets a chunk every this many tokens (the first and the last at "
                    "once); larger values send fewer, larger chunks and leave more of the CPU to the model")
    _spec_flag(model, "--stream-interval-s", type=float,
               help="send streamed tokens at most this often per request (fewer, larger chunks under load)")
    replicas = srv.add_argument_group("Serve: replicas and their resources")
    _spec_flag(replicas, "--num-replicas", type=int)
    _spec_flag(replicas, "--min-replicas", type=int, help="with --max-replicas: autoscale between them")
    _spec_flag(replicas, "--max-replicas", type=int)
    _spec_flag(replicas, "--max-ongoing-requests", type=int, help="per replica")
    _spec_flag(replicas, "--num-cpus", type=float, help="CPUs Ray reserves for each model replica")
    _spec_flag(replicas, "--num-cpus-per-worker", type=float,
               help="CPUs of each tensor/pipeline-parallel worker, and its threads")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
