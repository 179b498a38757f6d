"""The front door every API shares: prompts become validated token ids and engine requests.

Bad input raises `ValueError` / `TypeError` here, before anything is queued, so the engine never sees it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.engine.request import Request
from shardserve.entrypoints.prompt_embeds import validate_prompt_embeds
from shardserve.inputs import PromptType
from shardserve.sampling_params import SamplingParams


@dataclass
class ProcessedPrompt:
    """A validated prompt: token ids, or (for prompt embeddings) one placeholder id per embedding row."""
    text: str | None
    token_ids: list[int]
    embeds: torch.Tensor | None = None


class Processor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: set[int],
                 embed_dim: int, dtype: torch.dtype, enable_prompt_embeds: bool = False):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.embed_dim = embed_dim
        self.dtype = dtype
        self.enable_prompt_embeds = enable_prompt_embeds

    def process_prompt(self, prompt: PromptType | ProcessedPrompt) -> ProcessedPrompt:
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            if not self.enable_prompt_embeds:
                raise ValueError("Prompt embeddings are disabled: create the LLM with enable_prompt_embeds=True "
                                 "(--enable-prompt-embeds for the server).")
            embeds = validate_prompt_embeds(prompt["prompt_embeds"], self.embed_dim, self.max_model_len,
                                            self.dtype, torch.device("cpu"))
            return ProcessedPrompt(None, [0] * embeds.shape[0], embeds)
        return ProcessedPrompt(*self.tokenize(prompt))

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], None
        else:
            raise TypeError(f"A prompt must be a string, a TextPrompt or a TokensPrompt, got {type(prompt).__name__}.")
        if ids is None:
            if not isinstance(text, str):
                raise TypeError(f"The prompt text must be a string, got {type(text).__name__}.")
            if not text:
                raise ValueError("The prompt cannot be empty.")
            if self.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; pass prompt_token_ids instead.")
            ids = self.tokenizer.encode(text)
        return text, self.validate_token_ids(ids)

    def validate_token_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("prompt_token_ids must be a list of ints.")
        if not ids:
            raise ValueError("The prompt cannot be empty.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (the model's vocab_size is {self.vocab_size}).")
        if len(ids) > self.max_model_len:
            raise ValueError(f"The prompt (length {len(ids)}) is longer than the maximum model length of "
                             f"{self.max_model_len}.")
        return list(ids)

    def validate_params(self, params: SamplingParams) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Expected SamplingParams, got {type(params).__name__}.")
        for token_id in list(params.logit_bias or {}) + list(params.stop_token_ids):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"Token id {token_id} is out of vocabulary (the model's vocab_size is "
                                 f"{self.vocab_size}).")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name}={value} exceeds the vocabulary size {self.vocab_size}.")
        params = params.clone()
        if not params.ignore_eos:
            params.all_stop_token_ids = set(self.eos_token_ids)
        else:
            params.all_stop_token_ids = set()
        return params

    def make_requests(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                      params: SamplingParams) -> list[Request]:
        """One request per completion: n > 1 fans out into n requests sharing the prompt (and so, through
        the prefix cache, its KV blocks)."""
        prompt = self.process_prompt(prompt)
        params = self.validate_params(params)
        if prompt.embeds is not None and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs are not available for prompt embeddings (there are no prompt tokens).")
        ids = prompt.token_ids
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        if params.n == 1:
            return [Request(request_id, ids, params, prompt=prompt.text, prompt_embeds=prompt.embeds)]
        children = []
        for i in range(params.n):
            child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            children.append(Request(f"{i}_{request_id}", ids, child_params, prompt=prompt.text, index=i,
                                    parent_id=request_id, prompt_embeds=prompt.embeds))
        return children
