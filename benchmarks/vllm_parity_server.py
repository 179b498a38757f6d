#!/usr/bin/env python
"""Does `shardserve serve` answer HTTP requests as `vllm serve` does? The same requests to both, compared.

Starts vLLM's OpenAI server (from .venv-vllm) on the model, sends every request below, stops it; then the
same with `shardserve serve` (its CLI, on a local Ray cluster). Each answer is compared as JSON: status, and
every field but ids and timestamps; a field one server leaves out and the other sends as null counts as the
same (clients read both as None), numbers within --atol. Streams are compared chunk by chunk. Prints
"same" or the differences per request. Greedy requests only.

Usage: .venv/bin/python benchmarks/vllm_parity_server.py --model DIR (a tokenizer with BPE, head_dim >= 64:
see benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _stop  # noqa: E402
from throughput import CACHE_DIR, VLLM_VENV, vllm_preload  # noqa: E402
from vllm_parity import TEMPLATE, lora_adapters, report  # noqa: E402

PORT = 8123
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The capital of France"}]
IGNORED = {"id", "created", "system_fingerprint", "created_at", "item_id", "call_id", "sequence_number"}
# an answer in hermes' format, which a structured-output choice makes the random model write
CALL = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
STRICT_TOOLS = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in STRICT_TOOLS]


def reasoning_requests(think_end: int) -> dict[str, tuple[str, str, dict]]:
    """For --reasoning-parser: `think_end`, the id of </think> (a logit bias on it makes the model end its
    thinking)."""
    chat = {"model": "parity", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    ended = {**chat, "max_tokens": 200, "tools": TOOLS, "logit_bias": {str(think_end): 30},
             "structured_outputs": {"choice": [CALL]}}
    plain = {**chat, "max_tokens": 16, "structured_outputs": {"choice": ["Paris", "Rome"]}}
    thought = {"model": "parity", "input": MESSAGES[1]["content"], "max_output_tokens": 12, "temperature": 0}
    return {
        "reasoning: thinking all along": ("POST", "/v1/chat/completions", chat),
        "reasoning: thinking all along, stream": ("POST", "/v1/chat/completions", {
            **chat, "stream": True, "stream_options": {"include_usage": True}}),
        "reasoning: ended by the model, then a tool call": ("POST", "/v1/chat/completions", ended),
        "reasoning: ended by the model, then a tool call, stream": ("POST", "/v1/chat/completions", {
            **ended, "stream": True, "stream_options": {"include_usage": True}}),
        "reasoning: include_reasoning false": ("POST", "/v1/chat/completions", {
            **plain, "include_reasoning": False, "logprobs": True}),
        "reasoning: enable_thinking false": ("POST", "/v1/chat/completions", {
            **plain, "chat_template_kwargs": {"enable_thinking": False}}),
        "reasoning: reasoning_effort none": ("POST", "/v1/chat/completions", {**plain, "reasoning_effort": "none"}),
        "reasoning: responses, thinking all along": ("POST", "/v1/responses", thought),
        "reasoning: responses stream, thinking all along": ("POST", "/v1/responses", {**thought, "stream": True}),
        "reasoning: responses, thinking ended, then JSON": ("POST", "/v1/responses", {
            **thought, "max_output_tokens": 48, "logit_bias": {str(think_end): 30}, "text": {"format": {
                "type": "json_schema", "name": "city", "schema": {
                    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}}),
    }


def lora_requests(adapters: dict[str, str]) -> dict[str, tuple[str, str, dict]]:
    """For --lora, in this order: adapters loaded, run, replaced, unloaded at run time, and one found by the
    filesystem resolver. `adapters`: name -> folder ("rt", "rt2" loadable; "found-lora" in the resolver's
    folder)."""
    c = {"model": "rt", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    load = {"lora_name": "rt", "lora_path": adapters["rt"]}
    return {
        "lora: load": ("POST", "/v1/load_lora_adapter", load),
        "lora: completion through it": ("POST", "/v1/completions", c),
        "lora: chat stream through it": ("POST", "/v1/chat/completions", {
            "model": "rt", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}),
        "models, with a run-time adapter": ("GET", "/v1/models", None),
        "lora: beam search through it": ("POST", "/v1/completions", {
            **c, "n": 2, "use_beam_search": True, "max_tokens": 5}),
        "error: lora, load it again": ("POST", "/v1/load_lora_adapter", load),
        "error: lora, load a base model's name": ("POST", "/v1/load_lora_adapter", {**load, "lora_name": "parity"}),
        "error: lora, no name": ("POST", "/v1/load_lora_adapter", {**load, "lora_name": ""}),
        "lora: load in place": ("POST", "/v1/load_lora_adapter", {**load, "lora_path": adapters["rt2"],
                                                                  "load_inplace": True}),
        "lora: completion after the new one": ("POST", "/v1/completions", c),
        "lora: unload": ("POST", "/v1/unload_lora_adapter", {"lora_name": "rt"}),
        "error: lora, unload it again": ("POST", "/v1/unload_lora_adapter", {"lora_name": "rt"}),
        "error: lora, completion after unload": ("POST", "/v1/completions", c),
        "lora: found by the resolver": ("POST", "/v1/completions", {**c, "model": "found-lora"}),
        "error: lora, not in the resolver's folder": ("POST", "/v1/completions", {**c, "model": "missing"}),
    }


def make_adapters(model: str, folder: Path) -> dict[str, str]:
    """vllm_parity.py's two adapters of the model to load ("rt": its "all", "rt2": its "qv"), and one more in
    `folder`/resolver for the filesystem resolver."""
    adapters = lora_adapters(Path(model), folder)
    from conftest import make_lora_dir  # on the path now: lora_adapters put it there
    return {"rt": adapters["all"], "rt2": adapters["qv"],
            "found-lora": make_lora_dir(folder / "resolver" / "found-lora", model, seed=3)}


def requests() -> dict[str, tuple[str, str, dict | bytes | None]]:
    """name -> (method, path, body)."""
    c = {"model": "parity", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    chat = {"model": "parity", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    responses = {"model": "parity", "instructions": MESSAGES[0]["content"], "input": MESSAGES[1]["content"],
                 "max_output_tokens": 8, "temperature": 0}
    return {
        "completion": ("POST", "/v1/completions", c),
        "completion, two token prompts": ("POST", "/v1/completions", {**c, "prompt": [[5, 6, 7], [8, 9, 10, 11]]}),
        "completion, logprobs 2 and echo": ("POST", "/v1/completions", {**c, "logprobs": 2, "echo": True}),
        "completion, n=2 top_k=1": ("POST", "/v1/completions", {**c, "n": 2, "temperature": 1.0, "top_k": 1}),
        "completion, stop string": ("POST", "/v1/completions", {**c, "max_tokens": 16, "stop": ["o"]}),
        "completion, max_tokens null": ("POST", "/v1/completions", {**c, "max_tokens": None, "ignore_eos": False,
                                                                    "prompt": "word " * 20}),
        "completion stream": ("POST", "/v1/completions", {**c, "stream": True,
                                                          "stream_options": {"include_usage": True}}),
        "completion stream, continuous usage": ("POST", "/v1/completions", {
            **c, "max_tokens": 4, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
        "completion, return_token_ids": ("POST", "/v1/completions", {**c, "return_token_ids": True}),
        "chat": ("POST", "/v1/chat/completions", chat),
        "chat, logprobs": ("POST", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2}),
        "chat stream": ("POST", "/v1/chat/completions", {**chat, "stream": True,
                                                         "stream_options": {"include_usage": True}}),
        "chat, max_completion_tokens": ("POST", "/v1/chat/completions", {**chat, "max_tokens": None,
                                                                         "max_completion_tokens": 3}),
        "completion, structured regex": ("POST", "/v1/completions", {
            **c, "max_tokens": 16, "structured_outputs": {"regex": "[a-c]{2,6}-[0-9]{1,3}"}}),
        "chat, response_format json_schema": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 32, "response_format": {"type": "json_schema", "json_schema": {
                "name": "v", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                        "required": ["ok"]}}}}),
        "chat, response_format json_object": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 16, "response_format": {"type": "json_object"}}),
        "chat, named tool call": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 32, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        "chat, required tool call": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 64, "tools": TOOLS, "tool_choice": "required"}),
        "chat stream, named tool call": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 48, "tools": TOOLS, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        "chat, required tool call, strict tools": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 64, "tools": STRICT_TOOLS, "tool_choice": "required"}),
        "chat stream, required tool call, strict tools": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 64, "tools": STRICT_TOOLS, "tool_choice": "required", "stream": True}),
        "chat, required tool call, one at most": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 96, "tools": STRICT_TOOLS, "tool_choice": "required", "parallel_tool_calls": False}),
        "chat, auto, strict tools": ("POST", "/v1/chat/completions", {**chat, "max_tokens": 24, "tools": STRICT_TOOLS}),
        "chat, auto, strict tools and a choice": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 96, "tools": STRICT_TOOLS, "structured_outputs": {"choice": ["yes", "no"]}}),
        "chat, auto, one call at most": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 24, "tools": TOOLS, "parallel_tool_calls": False}),
        "chat, auto tool call (hermes)": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 200, "tools": TOOLS, "structured_outputs": {"choice": [CALL]}}),
        "chat stream, auto tool call (hermes)": ("POST", "/v1/chat/completions", {
            **chat, "max_tokens": 200, "tools": TOOLS, "structured_outputs": {"choice": [CALL]}, "stream": True}),
        "chat, tools but no call (hermes)": ("POST", "/v1/chat/completions", {**chat, "tools": TOOLS}),
        "error: named tool not given": ("POST", "/v1/chat/completions", {
            **chat, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        "error: bad regex": ("POST", "/v1/completions", {**c, "structured_outputs": {"regex": "a(b"}}),
        "tokenize": ("POST", "/tokenize", {"model": "parity", "prompt": "The quick brown fox"}),
        "tokenize chat": ("POST", "/tokenize", {"model": "parity", "messages": MESSAGES}),
        "detokenize": ("POST", "/detokenize", {"model": "parity", "tokens": [5, 6, 7, 8]}),
        "models": ("GET", "/v1/models", None),
        "error: temperature -1": ("POST", "/v1/completions", {**c, "temperature": -1}),
        "error: n=2 greedy": ("POST", "/v1/completions", {**c, "n": 2}),
        "error: logprobs 21": ("POST", "/v1/completions", {**c, "logprobs": 21}),
        "error: prompt too long": ("POST", "/v1/completions", {**c, "prompt": "word " * 300}),
        "error: max_tokens past the model": ("POST", "/v1/completions", {**c, "max_tokens": 1000}),
        "responses": ("POST", "/v1/responses", responses),
        "responses stream": ("POST", "/v1/responses", {**responses, "stream": True}),
        "responses, input items and logprobs": ("POST", "/v1/responses", {
            **responses, "instructions": None, "top_logprobs": 2, "include": ["message.output_text.logprobs"],
            "input": [{"type": "message", "role": m["role"], "content": [{"type": "input_text", "text": m["content"]}]}
                      for m in MESSAGES]}),
        "responses, named function": ("POST", "/v1/responses", {
            **responses, "max_output_tokens": 64, "tools": RESPONSES_TOOLS,
            "tool_choice": {"type": "function", "name": "get_weather"}}),
        "responses stream, required function": ("POST", "/v1/responses", {
            **responses, "max_output_tokens": 64, "tools": RESPONSES_TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False, "stream": True}),
        "responses, a call given back": ("POST", "/v1/responses", {
            **responses, "tools": RESPONSES_TOOLS, "tool_choice": "none", "input": [
                {"type": "message", "role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city": "Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]}),
        "error: responses, previous_response_id": ("POST", "/v1/responses", {
            **responses, "previous_response_id": "resp_nope"}),
        "error: unknown model": ("POST", "/v1/completions", {**c, "model": "nope"}),
        "error: not JSON": ("POST", "/v1/completions", b"{not json"),
        "error: no messages": ("POST", "/v1/chat/completions", {"model": "parity"}),
    }


def ask(method: str, path: str, body) -> dict:
    url = f"http://127.0.0.1:{PORT}{path}"
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body} if body is not None else {}
    r = httpx.request(method, url, timeout=120, **kwargs)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        chunks = [c if c == "[DONE]" else _clean(json.loads(c)) for c in chunks]
        if chunks and isinstance(chunks[0], dict) and "type" in chunks[0]:   # the Responses API's events
            return {"status": r.status_code, "stream": _merged_events(chunks)}
        return {"status": r.status_code, "stream": _merged(chunks)}
    try:
        return {"status": r.status_code, "body": _clean(r.json())}
    except ValueError:
        return {"status": r.status_code, "text": r.text[:300]}


def _merged_events(events: list[dict]) -> dict:
    """What a Responses event stream says in all: the events in order (a run of deltas as one), each kind of
    delta joined, and the completed response."""
    kinds, joined, final = [], {}, None
    for event in events:
        kind = event["type"]
        if kind.endswith(".delta"):
            joined[kind] = joined.get(kind, "") + event["delta"]
            if kinds and kinds[-1] == kind:
                continue
        kinds.append(kind)
        final = event.get("response", final)
    return {"events": kinds, "deltas": joined, "response": final}


def _merged(chunks: list) -> dict:
    """What a stream says in all: each choice's text and logprob tokens joined, its finish reason, the last
    usage. Where the chunks fall is left out: a stream that falls behind the engine sends several tokens in one
    chunk (vLLM sends one per token, empty ones too)."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        if chunk == "[DONE]":
            continue
        usage = chunk.get("usage", usage)
        for c in chunk.get("choices", []):
            merged = choices.setdefault(c["index"], {"text": "", "tokens": [], "finish_reason": None})
            merged["text"] += c.get("text") or c.get("delta", {}).get("content") or ""
            if c.get("delta", {}).get("reasoning") is not None:
                merged["reasoning"] = merged.get("reasoning", "") + c["delta"]["reasoning"]
            for call in c.get("delta", {}).get("tool_calls") or []:  # each call's name and arguments, joined
                joined = merged.setdefault("tool_calls", {}).setdefault(str(call["index"]), {"name": "",
                                                                                            "arguments": ""})
                for key in ("name", "arguments"):
                    joined[key] += (call.get("function") or {}).get(key) or ""
            logprobs = c.get("logprobs") or {}
            merged["tokens"] += logprobs.get("tokens") or [t["token"] for t in logprobs.get("content", [])]
            merged["finish_reason"] = c.get("finish_reason", merged["finish_reason"])
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage, "done": chunks[-1:] == ["[DONE]"]}


def _clean(value):
    """Ids and timestamps out; nulls out (a missing field and a null one read the same)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in IGNORED and v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def wait_up(server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the server did not come up in 600 s: see {log}")
        time.sleep(2)


def serve_and_ask(engine: str, model: str, template: Path, reasoning_parser: str | None,
                  adapters: dict[str, str] | None) -> dict:
    common = ["--port", str(PORT), "--host", "127.0.0.1", "--served-model-name", "parity", "--dtype", "float32",
              "--max-model-len", "256", "--chat-template", str(template), "--seed", "0"]
    common += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    asked = requests()
    if reasoning_parser is not None:
        from transformers import AutoTokenizer
        common += ["--reasoning-parser", reasoning_parser]
        asked |= reasoning_requests(AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("</think>"))
    lora_env = {}
    if adapters is not None:  # both read vLLM's variables (vLLM needs its filesystem resolver plugin named)
        common += ["--enable-lora", "--max-lora-rank", "16"]
        asked |= lora_requests(adapters)
        lora_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_filesystem_resolver",
                    "VLLM_LORA_RESOLVER_CACHE_DIR": str(Path(adapters["found-lora"]).parent)}
    if engine == "vllm":
        # (both read VLLM_ENFORCE_STRICT_TOOL_CALLING from this environment: run with it 0 to compare forced tool
        # calls as JSON, by default they are written in the parser's format, hermes' tags)
        env = dict(os.environ, LD_PRELOAD=vllm_preload(), VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
                   **lora_env)
        cmd = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               *common, "--uvicorn-log-level", "warning"]
    else:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), TOKENIZERS_PARALLELISM="false",
                   **lora_env)
        cmd = [sys.executable, "-m", "shardserve", "serve", model, *common, "--kv-cache-memory-bytes", str(1 << 28)]
    log = CACHE_DIR / "logs" / f"parity-{engine}-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_up(server, log)
            return {name: ask(*req) for name, req in asked.items()}
        finally:
            _stop(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory with a tokenizer")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--out", help="also write both servers' answers here (JSON)")
    p.add_argument("--reasoning-parser", help="both servers read thinking so (the model's vocabulary must have its "
                   "tags), and the reasoning requests are asked too")
    p.add_argument("--lora", action="store_true", help="both servers with --enable-lora and runtime LoRA updating: "
                   "adapters loaded, run, replaced and unloaded, and one found by the filesystem resolver")
    a = p.parse_args()
    model = str(Path(a.model).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.jinja"
        template.write_text(TEMPLATE)
        adapters = make_adapters(model, Path(tmp)) if a.lora else None
        answers = {engine: serve_and_ask(engine, model, template, a.reasoning_parser, adapters)
                   for engine in ("vllm", "shardserve")}
    if a.out:
        Path(a.out).write_text(json.dumps(answers, indent=1))
    report(answers["shardserve"], answers["vllm"], a.atol, "requests")


if __name__ == "__main__":
    main()
