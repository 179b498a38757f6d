"""Prompt shapes that `LLM.generate` accepts besides a plain string (vLLM's `TextPrompt` / `TokensPrompt`)."""
from __future__ import annotations

from typing import TypedDict, Union

import torch
from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str
    cache_salt: NotRequired[str]   # prefix-cache blocks shared only between prompts of the same salt


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


class EmbedsPrompt(TypedDict):
    """Prompt embeddings instead of tokens: a [seq_len, hidden_size] (or [1, seq_len, hidden_size]) tensor.
    Needs `LLM(..., enable_prompt_embeds=True)`."""
    prompt_embeds: torch.Tensor


PromptType = Union[str, TextPrompt, TokensPrompt, EmbedsPrompt]
