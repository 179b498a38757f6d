"""Prompt shapes that `LLM.generate` accepts besides a plain string (vLLM's `TextPrompt` / `TokensPrompt`)."""
from __future__ import annotations

from typing import TypedDict, Union

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt]
