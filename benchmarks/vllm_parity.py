#!/usr/bin/env python
"""Does shardserve answer as vLLM does? The same offline calls on the same model in both engines, compared.

Each engine runs every scenario (a prompt, the keyword arguments of SamplingParams and of `generate`) in its
own subprocess (vLLM in .venv-vllm, as benchmarks/throughput.py builds it) and writes what came back: token
ids, text, finish and stop reasons, logprobs and prompt logprobs (ids, ranks, values), cumulative logprob.
The driver prints, per scenario, "same" or each field that differs. Greedy only: sampled tokens depend on
each engine's random numbers. Logprob values count as the same within --atol.

Usage: .venv/bin/python benchmarks/vllm_parity.py [--model-preset small]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import GEMMA3, PRESETS, chosen_model, ensure_vllm_venv, vllm_preload  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
LONG = list(range(20, 84))
# past a 512-token sliding window (Gemma 3's local layers), where --max-model-len allows it
PAST_WINDOW = [20 + (7 * i) % 3000 for i in range(600)]


CHOICES = ["yes", "no", "maybe later", "maybe not"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]},
                                           "n": {"type": "integer"}}, "required": ["ok", "tag", "n"]}
STRUCTURED = {"choice": {"choice": CHOICES}, "json": {"json": SCHEMA},
              "json, no whitespace": {"json": SCHEMA, "disable_any_whitespace": True},
              "json_object": {"json_object": True}, "regex": {"regex": r"[a-c]{2,6}-[0-9]{1,3}"},
              "grammar": {"grammar": 'root ::= "(" [0-9]+ ("," [0-9]+)* ")"'}}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t3{% endif %}"


def scenarios(free: list[int], tokenizer, max_model_len: int) -> dict[str, tuple]:
    """name -> (prompt: token ids, text, or chat messages; SamplingParams kwargs, or BeamSearchParams kwargs
    for beam search; more keyword arguments of the call). `free`: the greedy continuation of PROMPT (from a
    first call), so stop tokens and words can be picked from what the model says."""
    greedy = dict(temperature=0.0, max_tokens=12)
    eos = tokenizer.eos_token_id
    text = tokenizer.decode(PROMPT, skip_special_tokens=True)
    word = tokenizer.decode(free[5:6]).strip() or tokenizer.decode(free[5:7])   # a stop string the model says
    return {
        "text prompt": (text, {**greedy, "ignore_eos": True}, {}),
        "text prompt, no special tokens": (text, {**greedy, "ignore_eos": True},
                                           {"tokenization_kwargs": {"add_special_tokens": False}}),
        "chat": ([{"role": "user", "content": text}], {**greedy, "ignore_eos": True}, {"chat_template": TEMPLATE}),
        "beam search": (PROMPT, {"beam_width": 3, "max_tokens": 6}, {}),
        "beam search, length penalty": (PROMPT, {"beam_width": 2, "max_tokens": 5, "length_penalty": 0.5}, {}),
        "stop string over two tokens": (PROMPT, {**greedy, "stop": [tokenizer.decode(free[5:7]).strip()]}, {}),
        "logprobs 0, prompt logprobs 0": (PROMPT, {**greedy, "logprobs": 0, "prompt_logprobs": 0,
                                                   "ignore_eos": True}, {}),
        "greedy": (PROMPT, {**greedy, "ignore_eos": True}, {}),
        "stop token (not special)": (PROMPT, {**greedy, "stop_token_ids": [free[4]]}, {}),
        "stop token, kept": (PROMPT, {**greedy, "stop_token_ids": [free[4]], "include_stop_str_in_output": True}, {}),
        "stop token under min_tokens": (PROMPT, {**greedy, "stop_token_ids": [free[0]], "min_tokens": 3}, {}),
        "EOS forced by logit_bias": (PROMPT, {**greedy, "logit_bias": {eos: 100.0}, "min_tokens": 2}, {}),
        "EOS, special tokens kept": (PROMPT, {**greedy, "logit_bias": {eos: 100.0}, "min_tokens": 2,
                                              "skip_special_tokens": False}, {}),
        "stop string": (PROMPT, {**greedy, "stop": [word]}, {}),
        "stop string, kept": (PROMPT, {**greedy, "stop": [word], "include_stop_str_in_output": True}, {}),
        "logprobs 3": (PROMPT, {**greedy, "logprobs": 3, "ignore_eos": True}, {}),
        "prompt logprobs 2": (PROMPT, {**greedy, "max_tokens": 2, "prompt_logprobs": 2}, {}),
        "n=2 greedy (refused)": (PROMPT, {**greedy, "n": 2, "ignore_eos": True}, {}),
        "n=2, top_k=1": (PROMPT, {**greedy, "temperature": 1.0, "top_k": 1, "n": 2, "ignore_eos": True}, {}),
        "allowed_token_ids": (PROMPT, {**greedy, "allowed_token_ids": list(range(300, 330)), "ignore_eos": True}, {}),
        "bad_words": (PROMPT, {**greedy, "bad_words": [tokenizer.decode(free[1:2]).strip()], "ignore_eos": True}, {}),
        "penalties": (PROMPT, {**greedy, "presence_penalty": 0.8, "frequency_penalty": 0.5,
                               "repetition_penalty": 1.3, "ignore_eos": True}, {}),
        "max_tokens past the model (runs to it)": (PROMPT, {**greedy, "max_tokens": 1000, "ignore_eos": True}, {}),
        "max_tokens None": (LONG[:40], {"temperature": 0.0, "max_tokens": None, "ignore_eos": True}, {}),
        "detokenize off": (PROMPT, {**greedy, "detokenize": False, "ignore_eos": True}, {}),
        # structured outputs, where the tokenizer can write any text (a word-level one cannot)
        **({f"structured {name}": (PROMPT, {**greedy, "max_tokens": 32, "structured_outputs": kwargs}, {})
            for name, kwargs in STRUCTURED.items()}
           if all(tokenizer.unk_token_id not in tokenizer.encode(c, add_special_tokens=False) for c in CHOICES)
           else {}),
        "truncate_prompt_tokens": (LONG, {**greedy, "ignore_eos": True},
                                   {"tokenization_kwargs": {"truncate_prompt_tokens": 10,
                                                            "truncation_side": "left"}}),
        **({"600-token prompt, logprobs 2": (PAST_WINDOW, {**greedy, "logprobs": 2, "ignore_eos": True}, {})}
           if max_model_len > len(PAST_WINDOW) + 12 else {}),
    }


# Where we answer otherwise on purpose: (scenario prefix or prefixes, field suffix, why).
_RESPONSES = ("responses", "reasoning: responses", "error: responses")
ON_PURPOSE = [("beam search", "finish_reason", 'a beam that ended with EOS says "stop" offline too (vLLM leaves it '
               'None offline and says "stop" online)'),
              ("structured json, no whitespace", "", "the request's disable_any_whitespace is honoured (vLLM's "
               "xgrammar backend reads only the engine's structured_outputs_config)"),
              ("models", "owned_by", "shardserve serves them"),
              ("models, with", "max_model_len", "an adapter's entry gives its model's max_model_len (vLLM's: null)"),
              ("models", "permission[0].id", "a permission id of its own"),
              ("error: prompt too long", "error.message", "the prompt's whole length in tokens (vLLM's: 'at least' "
               "the model's length + 1, where it stops tokenizing)"),
              ("error: bad regex", "error.message", "xgrammar's words for a bad regex, which it compiles (vLLM "
               "checks a regex with a parser of its own first)"),
              ("error: not JSON", "", "a body that is not JSON: a sentence of ours (vLLM: pydantic's error "
               'list, type "Bad Request", param "body.1")'),
              ("error: no messages", "error.message", "a body that fails its schema: each error's place and "
               "message (vLLM: pydantic's error list)"),
              ("error: no messages", "error.type", 'BadRequestError, as any 400 of ours (vLLM: "Bad Request")'),
              (_RESPONSES, "input_tokens", "a response's prompt is the chat's (vLLM 0.32's Responses API adds the "
               "tokenizer's special tokens to what the chat template wrote: here a BOS, twice where a template "
               "writes one), so the answers after it differ too"),
              (_RESPONSES, "text", "the same prompt difference (input_tokens)"),
              (_RESPONSES, "arguments", "the same prompt difference (input_tokens)"),
              (_RESPONSES, "delta", "the same prompt difference (input_tokens)"),
              (_RESPONSES, "reasoning_tokens", "the same prompt difference (input_tokens)"),
              (_RESPONSES, "total_tokens", "the same prompt difference (input_tokens)"),
              (_RESPONSES, "_per_turn", "vLLM's usage fields for multi-turn tool runs, empty here, left out"),
              (_RESPONSES, "tool_output_tokens", "vLLM's usage fields for multi-turn tool runs, left out"),
              (_RESPONSES, "cache_write_tokens", "a vLLM usage field for KV transfer, left out"),
              ("chat stream", "reasoning_tokens", "a stream's usage counts the thinking tokens its whole answer "
               "counts (vLLM's stream counted fewer: those of its reasoning deltas)"),
              ("reasoning: thinking all along, stream", "reasoning_tokens", "a stream's usage counts the thinking "
               "tokens its whole answer counts (vLLM's stream counted fewer: those of its reasoning deltas)"),
              ("lora", "error", "vLLM 0.32 on a CPU runs no LoRA on a mixture of experts (its MoE LoRA kernels need "
               "Triton's GPU backend); ours serves the adapter, experts and routers too (tests/test_lora.py)"),
              ("lora, none", "", "a request without an adapter answers as the base model does (vLLM 0.32 on CPU "
               "answered otherwise beside adapter requests in one batch, and differently from run to run)"),
              ("reasoning, deepseek_r1 #5", "whole[0]", "a whole answer reads as its stream does: text before a late "
               "<think> stays thinking (vLLM's stream keeps it too; its whole answer drops it)"),
              ("reasoning, deepseek_r1 #6", "streamed[1]", "a stream reads as its whole answer does: a repeated "
               "</think> stays in R1's answer (vLLM's whole answer keeps it too; its stream drops it)"),
              ("reasoning, qwen3 without thinking", "whole[1]", "Qwen3's answer never carries a stray </think>, "
               "streamed or whole (vLLM's stream drops it too; its whole answer without thinking keeps it)")]


def run(engine: str, model: str, thinking: str, loras: dict[str, str], max_model_len: int) -> dict:
    mod = importlib.import_module(engine)
    tokens_prompt = importlib.import_module(f"{engine}.inputs").TokensPrompt
    beam_params = getattr(mod, "BeamSearchParams", None) or importlib.import_module(
        f"{engine}.sampling_params").BeamSearchParams
    kwargs = dict(dtype="float32", max_model_len=max_model_len, seed=0)
    if engine == "vllm":
        kwargs["kv_cache_memory_bytes"] = 1 << 28
    llm = mod.LLM(model=model, **kwargs)

    def generate(prompt, params, extra):
        if "beam_width" in params:
            out = llm.beam_search([tokens_prompt(prompt_token_ids=prompt)], beam_params(**params))[0]
            return {"sequences": [{"tokens": list(b.tokens), "cum_logprob": b.cum_logprob,
                                   "finish_reason": b.finish_reason} for b in out.sequences]}
        if isinstance(prompt, list) and isinstance(prompt[0], dict):
            out = llm.chat(prompt, mod.SamplingParams(**params), use_tqdm=False, **extra)[0]
        else:
            out = llm.generate([prompt if isinstance(prompt, str) else tokens_prompt(prompt_token_ids=prompt)],
                               mod.SamplingParams(**params), use_tqdm=False, **extra)[0]
        return {"prompt_token_ids": list(out.prompt_token_ids),
                "prompt_logprobs": _logprobs(out.prompt_logprobs),
                "completions": [{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
                                 "stop_reason": c.stop_reason, "cumulative_logprob": c.cumulative_logprob,
                                 "logprobs": _logprobs(c.logprobs)} for c in out.outputs]}
    free = generate(PROMPT, dict(temperature=0.0, max_tokens=12, ignore_eos=True), {})["completions"][0]["token_ids"]
    results = {}
    for name, (prompt, params, extra) in scenarios(free, llm.get_tokenizer(), max_model_len).items():
        if "structured_outputs" in params:  # each engine's own class, the same constraint
            so = getattr(mod, "StructuredOutputsParams", None) or importlib.import_module(
                f"{engine}.sampling_params").StructuredOutputsParams
            params = {**params, "structured_outputs": so(**params["structured_outputs"])}
        try:
            results[name] = generate(prompt, params, extra)
        except Exception as e:  # noqa: BLE001 - a refusal is an answer too
            results[name] = {"error": str(e).splitlines()[0][:200]}
    thinks = {"<think>", "</think>"} <= set(llm.get_tokenizer().get_vocab())  # a reasoning model's vocabulary
    llm = None  # the next engines are built with other settings: this one goes first
    if thinks:
        results |= reasoning_gate(engine, mod, model)
    try:
        results |= lora_scenarios(engine, mod, model, loras)
    except Exception as e:  # noqa: BLE001 - an engine without LoRA for this architecture says so
        results["lora"] = {"error": str(e).splitlines()[0][:200]}
    return results | parse_tool_calls(engine, model) | tool_call_tags(engine, model) | parse_reasoning(engine, thinking)


def lora_scenarios(engine: str, mod, model: str, loras: dict[str, str]) -> dict:
    """One batch through LoRA adapters (each engine's LoRARequest, the same PEFT folders) and without: greedy
    tokens and logprobs; then beam search through each adapter."""
    import gc
    gc.collect()
    kwargs = dict(dtype="float32", max_model_len=128, seed=0, enable_lora=True, max_loras=2, max_lora_rank=8)
    if engine == "vllm":
        kwargs["kv_cache_memory_bytes"] = 1 << 28
    llm = mod.LLM(model=model, **kwargs)
    lora_request = importlib.import_module(f"{engine}.lora.request").LoRARequest
    requests = [lora_request(name, i + 1, path) for i, (name, path) in enumerate(loras.items())] + [None]
    tokens_prompt = importlib.import_module(f"{engine}.inputs").TokensPrompt
    params = mod.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate([tokens_prompt(prompt_token_ids=PROMPT)] * len(requests), params, use_tqdm=False,
                        lora_request=requests)
    results = {f"lora, {r.lora_name if r else 'none'}": {"token_ids": list(o.outputs[0].token_ids),
                                                           "logprobs": _logprobs(o.outputs[0].logprobs)}
               for r, o in zip(requests, outs)}
    beam_params = getattr(mod, "BeamSearchParams", None) or importlib.import_module(
        f"{engine}.sampling_params").BeamSearchParams
    for r in requests[:-1]:  # beam search through each adapter
        out = llm.beam_search([tokens_prompt(prompt_token_ids=PROMPT)], beam_params(beam_width=2, max_tokens=5),
                              lora_request=r)[0]
        results[f"lora beam search, {r.lora_name}"] = {
            "sequences": [{"tokens": list(b.tokens), "cum_logprob": b.cum_logprob} for b in out.sequences]}
    return results


def reasoning_gate(engine: str, mod, model: str) -> dict:
    """Structured outputs under --reasoning-parser deepseek_r1: free while the model thinks, the grammar after
    </think> (in the prompt, or generated: a logit bias makes the model write it)."""
    import gc
    gc.collect()
    kwargs = dict(dtype="float32", max_model_len=128, seed=0, reasoning_parser="deepseek_r1")
    if engine == "vllm":
        kwargs["kv_cache_memory_bytes"] = 1 << 28
    llm = mod.LLM(model=model, **kwargs)
    so = getattr(mod, "StructuredOutputsParams", None) or importlib.import_module(
        f"{engine}.sampling_params").StructuredOutputsParams
    start, end = llm.get_tokenizer().convert_tokens_to_ids(["<think>", "</think>"])
    tokens_prompt = importlib.import_module(f"{engine}.inputs").TokensPrompt
    results = {}
    for name, prompt, bias in [("thinking", PROMPT, {}), ("thinking after <think>", PROMPT + [start], {}),
                               ("thinking ended in the prompt", PROMPT + [start, end], {}),
                               ("thinking ended by the model", PROMPT + [start], {end: 30.0})]:
        params = mod.SamplingParams(temperature=0.0, max_tokens=24, logit_bias=bias,
                                    structured_outputs=so(**STRUCTURED["regex"]))
        out = llm.generate([tokens_prompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
        results[f"reasoning gate, {name}"] = {"token_ids": list(out.token_ids), "text": out.text,
                                              "finish_reason": out.finish_reason}
    return results


# Answers as models write tool calls, for each engine's parsers of them (--tool-call-parser).
_CALL = '{"name": "get_weather", "%s": {"city": "Paris"}}'
_CALL_2 = '{"name": "get_time", "arguments": {"zone": "UTC", "note": "caf\u00e9"}}'
_PYTHONIC = ["Just text.", '[get_weather(city="Paris")]',
             "[get_weather(city='Rome', days=3), get_time(zone=\"UTC\", note='caf\u00e9')]",
             '[f(a=null, b=true, c=-1.5, d=(1, 2), e={"k": [1, {"x": false}]}, g=f"plain")]',
             '[f(1)]', '[a.b(x=1)]', '[f(x=y)]', '[f(x=1 + 2)]', '[ f(x=1)]', '[f(x=1) ]', '[]', '[_f(x=1)]',
             'Sure: [f(x=1)]', '[f(x=1)] and more', '[f(x=1)', '[f(x=1)]\n', 'f(x=1)', '[f(**{"x": 1})]',
             '[f(x={1: 2})]', '[f(x=b"raw")]', '[f(x=1j)]']
TOOL_CALL_ANSWERS = {
    "hermes": ["Just text.", f"Checking.<tool_call>\n{_CALL % 'arguments'}\n</tool_call>",
               f"<tool_call>{_CALL % 'arguments'}</tool_call>\n<tool_call>{_CALL_2}</tool_call>",
               f"<tool_call>{_CALL % 'arguments'}</tool_call><tool_call>{_CALL_2}", "<tool_call>{not json}</tool_call>",
               '<tool_call>{"name": "f"}</tool_call>', "a < b, and <tool"],
    "llama3_json": ["Just text.", _CALL % "parameters", f"<|python_tag|>{_CALL % 'parameters'}; {_CALL_2}",
                    f" {_CALL % 'parameters'}", '{"name": "f"}', "{not json", "<|python",
                    f"Sure: {_CALL % 'parameters'}", f"{_CALL % 'parameters'}{_CALL_2}",
                    f"{_CALL % 'parameters'} and then"],
    "pythonic": _PYTHONIC,
    "llama4_pythonic": _PYTHONIC + ['<|python_start|>[get_weather(city="Paris")]<|python_end|>',
                                    '<|python_start|>[get_weather(city="Paris")]']}


def parse_tool_calls(engine: str, model: str) -> dict:
    """Each answer of TOOL_CALL_ANSWERS read by the engine's parser of its format: content and (name, arguments)."""
    results = {}
    if engine == "vllm":  # its parsers want their tags in the vocabulary (ours read text only)
        from transformers import AutoTokenizer
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|python_tag|>", "<tool_call>", "</tool_call>"]})
        request = ChatCompletionRequest(model="x", messages=[{"role": "user", "content": "hi"}])
    for kind, answers in TOOL_CALL_ANSWERS.items():
        for i, text in enumerate(answers):
            if engine == "vllm":
                read = ToolParserManager.get_tool_parser(kind)(tokenizer).extract_tool_calls(text, request)
                content, calls = read.content, [(c.function.name, c.function.arguments) for c in read.tool_calls]
            else:
                from shardserve.router.tool_calls import TOOL_CALL_PARSERS
                content, read = TOOL_CALL_PARSERS[kind]().parse(text)
                calls = [(c["function"]["name"], c["function"]["arguments"]) for c in read]
            results[f"tool calls, {kind} #{i}"] = {"content": content, "calls": [list(c) for c in calls]}
    return results


# Requests whose answer strict tool calling holds to the parser's format (vLLM 0.32's default): parser, level,
# and the request's tools, tool_choice, parallel_tool_calls and structured outputs.
_CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": _CITY}},
          {"type": "function", "function": {"name": "get_time", "description": "Now.", "parameters": {
              "type": "object", "properties": {"zone": {"type": "string"}}}}}]
_STRICT = [{"type": "function", "function": {**_TOOLS[0]["function"], "strict": True}}, _TOOLS[1]]
_NAMED = {"type": "function", "function": {"name": "get_time"}}
TAGGED_REQUESTS = {
    f"{parser}, {level}, {name}": (parser, level, request)
    for parser in ("hermes", "llama3_json", "pythonic") for level in ("auto", "function", "parameter")
    for name, request in {
        "required": {"tools": _TOOLS, "tool_choice": "required"},
        "required, one call": {"tools": _STRICT, "tool_choice": "required", "parallel_tool_calls": False},
        "named": {"tools": _STRICT, "tool_choice": _NAMED},
        "auto": {"tools": _TOOLS, "tool_choice": "auto"},
        "auto, a strict tool": {"tools": _STRICT, "tool_choice": "auto"},
        "auto, one call": {"tools": _TOOLS, "tool_choice": "auto", "parallel_tool_calls": False},
        "auto, a strict tool and a schema": {"tools": _STRICT, "tool_choice": "auto",
                                             "structured_outputs": {"json": _CITY}},
        "auto, a strict tool and a choice": {"tools": _STRICT, "tool_choice": "auto",
                                             "structured_outputs": {"choice": ["yes", "no"]}},
        "none": {"tools": _STRICT, "tool_choice": "none"},
    }.items()}


def tool_call_tags(engine: str, model: str) -> dict:
    """The structural tag (or other constraint) each engine's chat server puts on TAGGED_REQUESTS: vLLM's parser
    adjusting its request, our request's `structured()` with the server's parser's tag."""
    results = {}
    if engine == "vllm":
        from transformers import AutoTokenizer
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.parser.parser_manager import ParserManager
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|python_tag|>", "<tool_call>", "</tool_call>"]})
    else:
        from shardserve.router.protocol import ChatCompletionRequest
        from shardserve.router.tool_calls import TOOL_CALL_PARSERS
        from shardserve.router.tool_tags import ToolStrictLevel
    for name, (parser, level, fields) in TAGGED_REQUESTS.items():
        request = ChatCompletionRequest(model="x", messages=[{"role": "user", "content": "hi"}], **fields)
        if engine == "vllm":
            parser_cls = ParserManager.get_parser(tool_parser_name=parser, enable_auto_tools=True,
                                                  tool_strict_level=level)
            structured = parser_cls(tokenizer, request.tools).adjust_request(request).structured_outputs
        else:
            structured = request.structured(TOOL_CALL_PARSERS[parser]().tag_model, ToolStrictLevel.from_name(level))
        given = {} if structured is None else {k: getattr(structured, k) for k in (
            "json", "regex", "choice", "grammar", "structural_tag") if getattr(structured, k, None) is not None}
        if "structural_tag" in given:
            given["structural_tag"] = json.loads(given["structural_tag"])
        results[f"tool call tag, {name}"] = given
    return results


# Answers as reasoning models write them, for each engine's parsers of them (--reasoning-parser), whole and streamed
# a token at a time; qwen3 also with chat_template_kwargs enable_thinking false.
REASONING_ANSWERS = ["plain answer", "<think>step</think>answer", "step</think>answer", "step</think>", "<think>step",
                     "a<think>b</think>c", "x</think>y</think>z", "think<tool_call>{}</tool_call>",
                     "\n\nans</think>\n\nc", "caf\u00e9 \u4f60\u597d</think> ok"]
REASONING_PARSERS = {"deepseek_r1": {}, "qwen3": {}, "qwen3 without thinking": {"enable_thinking": False}}


def lora_adapters(model: Path, folder: Path) -> dict[str, str]:
    """Two random PEFT adapters of the model, as tests/conftest.py makes them: "all" (every projection, rank 4)
    and "qv" (q and v, rank 8, rsLoRA's scaling)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_lora_dir
    return {"all": make_lora_dir(folder / "lora-all", str(model), seed=1),
            "qv": make_lora_dir(folder / "lora-qv", str(model), targets=("q_proj", "v_proj"), rank=8, alpha=16,
                                seed=2, use_rslora=True)}


def thinking_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with a reasoning model's tags as (non-special) tokens, saved for both engines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(REASONING_ANSWERS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    fast.save_pretrained(path)


def parse_reasoning(engine: str, tokenizer_dir: str) -> dict:
    """Each answer of REASONING_ANSWERS read by the engine's reasoning parsers: (reasoning, content) of the whole
    answer, and of its stream (the deltas joined)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if engine == "vllm":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.reasoning import ReasoningParserManager
        request = ChatCompletionRequest(model="x", messages=[{"role": "user", "content": "hi"}])
    else:
        from shardserve.engine.reasoning import reasoning_parser_for
    results = {}
    for name, kwargs in REASONING_PARSERS.items():
        for i, text in enumerate(REASONING_ANSWERS):
            ids = tokenizer.encode(text, add_special_tokens=False)
            prefixes = [tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
            streamed = ["", ""]
            if engine == "vllm":
                parser_class = ReasoningParserManager.get_reasoning_parser(name.split()[0])
                make = (lambda: parser_class(tokenizer, chat_template_kwargs=kwargs)) if kwargs else \
                    (lambda: parser_class(tokenizer))
                whole = list(make().extract_reasoning(text, request))
                parser = make()
                deltas = [parser.extract_reasoning_streaming(prefixes[n], prefixes[n + 1], prefixes[n + 1][len(
                    prefixes[n]):], ids[:n], ids[:n + 1], ids[n:n + 1]) for n in range(len(ids))]
                if hasattr(parser, "finish_streaming"):
                    deltas.append(parser.finish_streaming())
                for d in deltas:
                    if d is not None:
                        streamed = [streamed[0] + (d.reasoning or ""), streamed[1] + (d.content or "")]
            else:
                parser = reasoning_parser_for(name.split()[0], tokenizer).for_chat(kwargs)
                whole, stream = list(parser.split(text)), parser.stream()
                for prefix in prefixes[1:]:
                    new = stream.advance(prefix)
                    streamed = [streamed[0] + new[0], streamed[1] + new[1]]
            results[f"reasoning, {name} #{i}"] = {"whole": whole, "streamed": [s or None for s in streamed]}
    return results


def _logprobs(entries) -> list | None:
    """Each position's entries as sorted [id, rank, logprob] triples (None where a position has none)."""
    if entries is None:
        return None
    return [None if e is None else sorted([t, lp.rank, lp.logprob] for t, lp in e.items()) for e in entries]


def differences(ours, theirs, atol: float, path: str = "") -> list[str]:
    if isinstance(ours, float) and isinstance(theirs, float):
        return [] if abs(ours - theirs) <= atol else [f"{path}: {ours:.5f} vs {theirs:.5f}"]
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(ours) | set(theirs))
                for d in differences(ours.get(k), theirs.get(k), atol, f"{path}.{k}" if path else k)]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, atol, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {_short(ours)} vs {_short(theirs)}"]


def _on_purpose(scenario: str, difference: str) -> str | None:
    field = difference.split(":")[0]
    return next((why for prefix, suffix, why in ON_PURPOSE if scenario.startswith(prefix) and field.endswith(suffix)),
                None)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-preset", choices=sorted(PRESETS) + [GEMMA3], default="small")
    src.add_argument("--model", help="HF model directory (with tokenizer) instead of a preset")
    p.add_argument("--atol", type=float, default=1e-3, help="logprob values within this count as the same")
    p.add_argument("--max-model-len", type=int, default=128,
                   help="of both engines; past 612 a scenario with a 600-token prompt runs too")
    p.add_argument("--worker", choices=("shardserve", "vllm"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--thinking-tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--loras", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        Path(a.out).write_text(json.dumps(run(a.worker, a.model, a.thinking_tokenizer, json.loads(a.loras),
                                              a.max_model_len)))
        return
    model = str(chosen_model(p, a))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        thinking_tokenizer(Path(tmp) / "thinking")
        loras = lora_adapters(Path(model), Path(tmp))
        for engine in ("shardserve", "vllm"):
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
            if engine == "vllm":
                python = str(ensure_vllm_venv())
                env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", LD_PRELOAD=vllm_preload())
            else:
                python = sys.executable
                env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
            out = Path(tmp) / f"{engine}.json"
            proc = subprocess.run([python, __file__, "--worker", engine, "--model", model, "--out", str(out),
                                   "--thinking-tokenizer", str(Path(tmp) / "thinking"), "--loras", json.dumps(loras),
                                   "--max-model-len", str(a.max_model_len)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{engine} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            results[engine] = json.loads(out.read_text())
    report(results["shardserve"], results["vllm"], a.atol, f"scenarios (model {model})")


def report(ours: dict, theirs: dict, atol: float, what: str) -> None:
    """Per name: same, different on purpose (why), or each difference (ours vs vLLM's); then the count."""
    num_same = 0
    for name in theirs:
        diff = differences(ours.get(name, {"error": "not run"}), theirs[name], atol)
        whys = [_on_purpose(name, d) for d in diff]
        if diff and all(whys):
            print(f"{name}: differs on purpose: {'; '.join(sorted(set(whys)))}")
        else:
            print(f"{name}: " + ("same" if not diff else "DIFFERENT (ours vs vLLM's)"))
            for d in diff[:10]:
                print(f"    {d}")
        num_same += not diff or all(whys)
    print(f"\n{num_same} of {len(theirs)} {what} answered as vLLM answers them, or otherwise on purpose")


if __name__ == "__main__":
    main()
