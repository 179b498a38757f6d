"""Structured outputs (vLLM's `StructuredOutputsParams`) on xgrammar, the grammar engine vLLM uses by default.

A request's constraint (a JSON schema, any JSON object, a regex, an EBNF grammar, a choice of strings, or
structural tags) is compiled once, when the request is processed, so a bad one is refused before anything is
queued. Each completion gets its own matcher: the grammar's state after the tokens generated so far.

Each step the engine asks the matchers of the requests that sample a token which tokens keep them inside their
grammar: one bit per vocabulary entry, a row per request (`GrammarBitmask`). The rows travel to the workers with
the step; the model runner turns them into a logits mask on the device. The sampled token then advances the
matcher. The grammar ends with the model's end-of-sequence tokens, so the request stops where its grammar does.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from dataclasses import dataclass

import torch

from shardserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with a timestamp and a source location; the user needs only the message.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# Compiled grammars kept for reuse (vLLM's VLLM_XGRAMMAR_CACHE_MB): requests of the same schema compile once, and
# a stream of distinct schemas cannot grow the cache without bound.
CACHE_BYTES = int(os.environ.get("SHARDSERVE_GRAMMAR_CACHE_MB", "512")) << 20
# Online, a constraint that takes longer to compile is refused (vLLM's VLLM_REGEX_COMPILATION_TIMEOUT_S): a
# crafted regex or schema must not hold a replica.
COMPILE_TIMEOUT_S = float(os.environ.get("SHARDSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "5"))


@dataclass
class GrammarBitmask:
    """The tokens each constrained request of a step may sample: `rows[request_id]` indexes `bits` (int32,
    ceil(vocab_size / 32) words a row, bit j of word w allowing token 32 w + j)."""
    rows: dict[str, int]
    bits: torch.Tensor


class StructuredOutputCompiler:
    """Compiles requests' constraints against the model's tokenizer (xgrammar caches compiled grammars, so
    requests of the same schema compile once)."""

    def __init__(self, tokenizer, vocab_size: int, compact_json: bool = False):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.compact_json = compact_json  # the engine's disable_any_whitespace, for every request
        self._compiler = None
        self._lock = threading.Lock()  # requests are processed on the callers' threads

    def _xgrammar(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr  # imported on first use: most engines never constrain a request
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                     cache_limit_bytes=CACHE_BYTES)
        return self._compiler

    def compile(self, structured: StructuredOutputsParams):
        """The compiled grammar of a request's constraint; ValueError naming the field when it does not compile."""
        if self.tokenizer is None:
            raise ValueError("Structured outputs need the model's tokenizer (skip_tokenizer_init is set).")
        compiler = self._xgrammar()
        kind = structured.kind
        # vLLM's disable_any_whitespace (the engine's, or the request's): JSON without whitespace between its items
        compact = self.compact_json or structured.disable_any_whitespace
        whitespace = {"any_whitespace": not compact, "separators": (",", ":") if compact else None}
        try:
            if kind == "json":
                schema = structured.json if isinstance(structured.json, str) else json.dumps(structured.json)
                return compiler.compile_json_schema(schema, **whitespace)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', **whitespace)
            if kind == "regex":
                return compiler.compile_regex(structured.regex)
            if kind == "grammar":  # EBNF (GBNF) rules are written `name ::= ...`; otherwise Lark's syntax, as vLLM
                grammar = structured.grammar
                return compiler.compile_grammar(grammar) if "::=" in grammar else compiler.compile_lark(grammar)
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(structured.choice))
            return self._compile_structural_tag(compiler, structured.structural_tag)
        except (RuntimeError, ValueError, TypeError) as e:
            message = _LOCATION.sub("", str(e).strip()).splitlines()[0]
            raise ValueError(f"Invalid structured_outputs.{kind}: {message}") from None

    async def compile_ahead(self, structured: StructuredOutputsParams, timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        """Compile on a thread, not on the server's event loop (which streams every other request meanwhile); the
        request's own `compile` then finds the grammar in the cache. Past `timeout_s` the request is refused;
        that compile runs on unseen (a thread cannot be stopped), as in vLLM."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.compile, structured), timeout_s)
        except TimeoutError:
            raise ValueError(f"Compiling structured_outputs.{structured.kind} took longer than {timeout_s:g} s: the "
                             f"constraint is too complex.") from None

    @staticmethod
    def _compile_structural_tag(compiler, spec: str):
        """vLLM's structural tags: text is free until a trigger, then each tag's `begin`, JSON of its schema,
        `end`. Both of vLLM's forms: {"structures": [...], "triggers": [...]}, and xgrammar's own format."""
        import xgrammar as xgr
        tag = json.loads(spec)
        if isinstance(tag, dict) and "structures" in tag:
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                     for s in tag["structures"]]
            return compiler.compile_structural_tag(items, tag["triggers"])
        return compiler.compile_structural_tag(spec)

    def matcher(self, grammar, stop_token_ids: set[int]):
        """A completion's own walk through `grammar`, which ends with one of `stop_token_ids`."""
        import xgrammar as xgr
        return xgr.GrammarMatcher(grammar, override_stop_tokens=sorted(stop_token_ids))

    def bitmask(self, requests: list) -> GrammarBitmask | None:
        """The allowed tokens of the `requests` (constrained ones sampling this step) whose grammar is not
        finished."""
        constrained = [r for r in requests if not r.grammar.is_terminated()]
        if not constrained:
            return None
        import xgrammar as xgr
        bits = xgr.allocate_token_bitmask(len(constrained), self.vocab_size)
        for row, request in enumerate(constrained):
            request.grammar.fill_next_token_bitmask(bits, row)
        return GrammarBitmask({r.request_id: row for row, r in enumerate(constrained)}, bits)


def accept_token(request, token_id: int) -> bool:
    """Advance a constrained request's grammar by its sampled token; False if the grammar refuses it (never
    expected: the step's mask allowed only tokens it accepts)."""
    grammar = request.grammar
    if grammar.is_terminated():
        return True
    if grammar.accept_token(token_id):
        return True
    logger.error("The grammar of request %s refused its sampled token %d; ending the request.",
                 request.request_id, token_id)
    return False


def _choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (string literals: quotes, backslashes and control
    characters escaped as in JSON, which EBNF literals read alike)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
