"""Reasoning models' thinking, as vLLM's `--reasoning-parser` reads it.

Models such as DeepSeek-R1 and Qwen3 think before they answer: `<think> ... </think>` comes first, then the
answer. A reasoning parser knows the family's tags and has two users:

- the engine, for structured outputs: a request's grammar holds only the answer, so it starts once reasoning has
  ended (in the prompt already, or at the token that ends it); the thinking is free text.
- the chat server, which returns the thinking as the message's `reasoning` and the rest as its `content` (where
  tool-call parsers then look for calls), streamed or whole.

The tags must be tokens of the model's vocabulary (vLLM's rule): the engine sees where thinking ends by token.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ReasoningParser:
    """`<think>` ... `</think>` reasoning at the start of the answer (DeepSeek-R1). The start tag may be missing:
    R1's chat template writes it into the prompt, so all text before the end tag is reasoning, and an answer that
    never ends its thinking is reasoning only."""
    name = "deepseek_r1"
    start = "<think>"
    end = "</think>"
    # Tags that end reasoning implicitly and belong to the answer (Qwen3 may call a tool without `</think>`).
    implicit_ends: tuple[str, ...] = ()
    # Tokens at which a scan of the prompt stops looking for tags (a chat turn's boundary), as vLLM's qwen3.
    turn_boundaries: tuple[str, ...] = ()

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        missing = [tag for tag in (self.start, self.end) if tag not in vocab]
        if missing:
            raise ValueError(f"The {type(self).name} reasoning parser needs {' and '.join(missing)} as tokens of the "
                             f"model's vocabulary.")
        self.start_id, self.end_id = vocab[self.start], vocab[self.end]
        self.implicit_end_ids = frozenset(vocab[t] for t in self.implicit_ends if t in vocab)
        self.boundary_ids = frozenset(vocab[t] for t in self.turn_boundaries if t in vocab)
        self.special_ids = frozenset(tokenizer.all_special_ids)   # EOS and the like: no thinking
        self.thinking = self.thinks({})

    def for_chat(self, chat_template_kwargs: dict[str, Any] | None) -> ReasoningParser:
        """This parser for a chat request with these template arguments: whether the model thinks can depend on
        them (Qwen3's enable_thinking). A copy: the tokens stay looked up once."""
        parser = copy.copy(self)
        parser.thinking = self.thinks(chat_template_kwargs or {})
        return parser

    @staticmethod
    def thinks(chat_template_kwargs: dict[str, Any]) -> bool:
        """Whether the model thinks under these chat-template arguments."""
        return True

    def is_reasoning_end(self, prompt_token_ids: Sequence[int]) -> bool:
        """Whether thinking has ended before the answer starts: the prompt's last tag (scanning back to a turn's
        boundary) is an end, or the model does not think at all."""
        if not self.thinking:
            return True
        for token_id in reversed(prompt_token_ids):
            if token_id == self.end_id or token_id in self.implicit_end_ids:
                return True
            if token_id == self.start_id or token_id in self.boundary_ids:
                return False
        return False

    def grammar_start(self, token_id: int) -> int | None:
        """Where an answer's grammar starts if `token_id` ends its thinking: 1 (after the end tag), 0 (at an
        implicit end, which is part of the answer), else None."""
        if token_id == self.end_id:
            return 1
        return 0 if token_id in self.implicit_end_ids else None

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of an answer: None where a part is missing. An answer streams as the growing
        parts of this split, so streamed and whole answers agree."""
        if not self.thinking:
            return None, self._content(text)
        thought, start, rest = text.partition(self.start)
        if start:  # the text before a start tag counts as thinking too (it was streamed as thinking)
            text = thought + rest
        end, tag = self._end(text)
        if end < 0:
            return text, None
        content = self._content(text[end + (len(tag) if tag == self.end else 0):])
        return text[:end], content or None

    def _end(self, text: str) -> tuple[int, str]:
        """Where the first tag that ends thinking is, and which; (-1, "") if none."""
        found = [(i, tag) for tag in (self.end, *self.implicit_ends) if (i := text.find(tag)) >= 0]
        return min(found) if found else (-1, "")

    def _content(self, content: str) -> str:
        return content

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        """Output tokens spent thinking: those before the end of thinking, tags and special tokens left out."""
        if not self.thinking:
            return 0
        count = 0
        for token_id in token_ids:
            if token_id == self.end_id or token_id in self.implicit_end_ids:
                break
            count += token_id != self.start_id and token_id not in self.special_ids
        return count

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3's thinking: as R1's, but `chat_template_kwargs={"enable_thinking": False}` turns it off (all is
    content), a tool call (`<tool_call>`) ends thinking without `</think>`, and the answer never carries a stray
    `</think>` (as vLLM's parser drops it)."""
    name = "qwen3"
    implicit_ends = ("<tool_call>",)
    turn_boundaries = ("<|im_start|>", "<|im_end|>")

    @staticmethod
    def thinks(chat_template_kwargs: dict[str, Any]) -> bool:
        return bool(chat_template_kwargs.get("enable_thinking", True))

    def _content(self, content: str) -> str:
        return content.replace(self.end, "")

    def split(self, text: str) -> tuple[str | None, str | None]:
        reasoning, content = super().split(text)
        return reasoning or None, content  # as vLLM's qwen3: no thinking before </think> is none


class DeepSeekV3ReasoningParser(ReasoningParser):
    """DeepSeek-V3.1: R1's thinking where the chat template is asked for it (`{"thinking": true}`), else none."""
    name = "deepseek_v3"

    @staticmethod
    def thinks(chat_template_kwargs: dict[str, Any]) -> bool:
        return bool(chat_template_kwargs.get("thinking", False) or chat_template_kwargs.get("enable_thinking", False))


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (ReasoningParser, Qwen3ReasoningParser, DeepSeekV3ReasoningParser)}


def reasoning_parser_for(name: str | None, tokenizer) -> ReasoningParser | None:
    """The parser `name` (vLLM's --reasoning-parser) for this tokenizer, or None where `name` is None."""
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}.")
    if tokenizer is None:
        raise ValueError("A reasoning parser needs the model's tokenizer.")
    return REASONING_PARSERS[name](tokenizer)


@dataclass
class ReasoningStream:
    """One streamed choice's thinking and answer: each call takes the text so far and gives what is new of each."""
    parser: ReasoningParser
    reasoning_sent: int = 0
    content: str = ""   # the answer so far

    def advance(self, text: str) -> tuple[str, str]:
        """(new thinking, new answer) of the text so far."""
        reasoning, content = self.parser.split(text)
        reasoning, content = reasoning or "", content or ""
        new_reasoning, new_content = reasoning[self.reasoning_sent:], content[len(self.content):]
        self.reasoning_sent, self.content = len(reasoning), content
        return new_reasoning, new_content
