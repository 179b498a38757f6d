"""The front door every API shares: prompts become validated token ids and engine requests.

Bad input raises `ValueError` / `TypeError` here, before anything is queued, so the engine never sees it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from shardserve.engine.reasoning import reasoning_parser_for
from shardserve.engine.request import Request
from shardserve.lora.adapter import check_adapter
from shardserve.lora.request import LoRARequest
from shardserve.engine.structured_output import StructuredOutputCompiler
from shardserve.entrypoints.prompt_embeds import validate_prompt_embeds
from shardserve.inputs import PromptType
from shardserve.models.pooling import PoolingModelConfig
from shardserve.pooling_params import TASK_PARAMETERS, PoolingParams
from shardserve.sampling_params import ParameterError, SamplingParams


@dataclass
class ProcessedPrompt:
    """A validated prompt: token ids, or (for prompt embeddings) one placeholder id per embedding row."""
    text: str | None
    token_ids: list[int]
    embeds: torch.Tensor | None = None
    token_type_ids: list[int] | None = None  # sentence pairs for encoders with token types; None = all 0
    cache_salt: str | None = None            # the prompt's prefix-cache blocks are shared only under this salt


@dataclass(frozen=True)
class TokenizationParams:
    """How a generation prompt becomes its tokens (vLLM's `tokenization_kwargs`, and the request fields of the
    same names online)."""
    add_special_tokens: bool = True            # a text prompt gets the tokenizer's special tokens (BOS)
    truncate_prompt_tokens: int | None = None  # keep this many tokens; -1: max_model_len - 1 (room to generate)
    truncation_side: str | None = None         # "left" keeps the last tokens, "right" the first; None: the tokenizer's

    def __post_init__(self) -> None:
        if self.truncation_side not in (None, "left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}.")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < -1):
            raise ValueError(f"truncate_prompt_tokens must be -1 or a non-negative integer, got {k!r}.")


class Processor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: set[int],
                 embed_dim: int, dtype: torch.dtype, enable_prompt_embeds: bool = False,
                 pooling: PoolingModelConfig | None = None, model_name: str = "", hf_config=None,
                 max_logprobs: int = 20, scheduling_policy: str = "fcfs", compact_json: bool = False,
                 reasoning_parser: str | None = None, max_lora_rank: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # vLLM's cap on the logprobs one request asks for; -1: none (the whole vocabulary)
        self.max_logprobs = vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.embed_dim = embed_dim
        self.dtype = dtype
        self.enable_prompt_embeds = enable_prompt_embeds
        self.pooling = pooling        # None: a generation model
        self.model_name = model_name  # as the user named it, for messages
        self.hf_config = hf_config
        self.scheduling_policy = scheduling_policy
        self.structured = StructuredOutputCompiler(tokenizer, vocab_size, compact_json)
        # Where a reasoning model's thinking ends, so that its grammar holds only the answer (None: from the start).
        self.reasoner = reasoning_parser_for(reasoning_parser, tokenizer)
        self.max_lora_rank = max_lora_rank   # None: LoRA is off (enable_lora)
        self._adapter_paths: dict[int, str] = {}   # each adapter id's folder, as first seen

    def process_prompt(self, prompt: PromptType | ProcessedPrompt,
                       tokenization: TokenizationParams | None = None) -> ProcessedPrompt:
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        tokenization = tokenization or TokenizationParams()
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            if not self.enable_prompt_embeds:
                raise ValueError("Prompt embeddings are disabled: create the LLM with enable_prompt_embeds=True "
                                 "(--enable-prompt-embeds for the server).")
            if tokenization.truncate_prompt_tokens is not None:
                raise ValueError("truncate_prompt_tokens applies to text and token prompts, not prompt embeddings.")
            embeds = validate_prompt_embeds(prompt["prompt_embeds"], self.embed_dim, self.max_model_len,
                                            self.dtype, torch.device("cpu"))
            return ProcessedPrompt(None, [0] * embeds.shape[0], embeds)  # never prefix-cached: no salt needed
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError("cache_salt must be a non-empty string.")
        text, ids = self._split_prompt(prompt)
        max_length = self._truncation_length(tokenization.truncate_prompt_tokens, generate=True)
        side = self._truncation_side(tokenization.truncation_side)
        if ids is None:
            text = self._checked_text(text, side if max_length is not None else None)
            ids = self.tokenizer.encode(text, add_special_tokens=tokenization.add_special_tokens)
        if max_length is not None and isinstance(ids, (list, tuple)) and len(ids) > max_length:
            # vLLM's rule for generation: the token list is cut as it is, special tokens included
            ids = ids[len(ids) - max_length:] if side == "left" else ids[:max_length]
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else None  # what is left of it
        return ProcessedPrompt(text, self.validate_token_ids(ids), cache_salt=salt)

    def _split_prompt(self, prompt: PromptType) -> tuple[str | None, list[int] | None]:
        """(text, token ids or None): the prompt's shape checked, and a text to tokenize checked."""
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            text, ids = prompt["prompt"], None
        else:
            raise TypeError(f"A prompt must be a string, a TextPrompt or a TokensPrompt, got {type(prompt).__name__}.")
        if not isinstance(text, str):
            raise TypeError(f"The prompt text must be a string, got {type(text).__name__}.")
        if not text:
            raise ValueError("The prompt cannot be empty.")
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer; pass prompt_token_ids instead.")
        return text, ids

    def validate_token_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError("prompt_token_ids must be a list of ints.")
        if not ids:
            raise ValueError("The prompt cannot be empty.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary (the model's vocab_size is {self.vocab_size}).")
        if len(ids) > self.max_model_len:
            raise self._too_long(len(ids))
        return list(ids)

    def _too_long(self, num_tokens: int, hint: str = "") -> ParameterError:
        return ParameterError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                              f"prompt contains {num_tokens} input tokens, which exceeds this limit even without any "
                              f"output tokens. Please reduce the length of the input prompt.{hint}", "input_tokens",
                              num_tokens)

    @functools.cached_property
    def _max_chars_per_token(self) -> int:
        return max(len(token) for token in self.tokenizer.get_vocab())

    def _checked_text(self, text: str, truncation_side: str | None) -> str:
        """A text with more characters than the model's length in the vocabulary's longest tokens cannot fit: it
        is refused before it is tokenized (as vLLM: a prompt of megabytes must not hold the server), or, where it
        is to be truncated (`truncation_side`), first cut to that many characters on that side."""
        limit = self.max_model_len * self._max_chars_per_token
        if len(text) <= limit:
            return text
        if truncation_side is None:
            raise ParameterError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                 f"your prompt contains {len(text)} characters (more than {limit} characters, which "
                                 f"is the upper bound for {self.max_model_len} input tokens). Please reduce the "
                                 f"length of the input prompt.", "input_text", len(text))
        return text[len(text) - limit:] if truncation_side == "left" else text[:limit]

    def require_generation(self) -> None:
        if self.pooling is not None:
            raise ValueError("This model runs with runner='pooling': it embeds, classifies or scores "
                             "(LLM.embed / encode / classify / score / reward) and cannot generate text. "
                             "Create the LLM with runner='generate' to generate.")

    def validate_params(self, params: SamplingParams) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Expected SamplingParams, got {type(params).__name__}.")
        self.require_generation()
        for token_id in list(params.logit_bias or {}) + list(params.stop_token_ids) + list(
                params.allowed_token_ids or []):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"Token id {token_id} is out of vocabulary (the model's vocab_size is "
                                 f"{self.vocab_size}).")
        outside = [t for t in params.logprob_token_ids or [] if not 0 <= t < self.vocab_size]
        if outside:
            raise ParameterError(f"token_id(s) {outside} in logprob_token_ids contain out-of-vocab token ids. "
                                 f"Vocabulary size: {self.vocab_size}", "logprob_token_ids")
        # -1 asks for the whole vocabulary; the engine's max_logprobs caps what one request may ask for (each
        # is a sort over the vocabulary and a list per token sent back).
        counts = {name: self.vocab_size if getattr(params, name) == -1 else getattr(params, name)
                  for name in ("logprobs", "prompt_logprobs")}
        for name, what in (("logprobs", "sample logprobs"), ("prompt_logprobs", "prompt logprobs")):
            if counts[name] is not None and counts[name] > self.max_logprobs:
                raise ParameterError(f"Requested {what} of {counts[name]}, which is greater than max allowed: "
                                     f"{self.max_logprobs}", name, counts[name])
        if params.logprob_token_ids is not None:  # up to MAX_LOGPROB_TOKEN_IDS whatever max_logprobs says
            counts["logprobs"] = len(params.logprob_token_ids)  # vLLM's num_logprobs
        params = params.clone(**counts)
        if params.thinking_token_budget is not None:
            if self.reasoner is None:
                raise ParameterError("thinking_token_budget is set but no reasoning parser is configured: start the "
                                     "engine with reasoning_parser (--reasoning-parser) to use it.",
                                     "thinking_token_budget", params.thinking_token_budget)
            params.thinking_tags = (self.reasoner.start_id, self.reasoner.end_id)
        params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words or [])
        if not params.ignore_eos:
            params.all_stop_token_ids = set(self.eos_token_ids)
        else:
            params.all_stop_token_ids = set()
        return params

    def validate_beam_width(self, beam_width: int) -> None:
        """Beam search asks for 2 x beam_width logprobs a step, which max_logprobs caps as for any request."""
        if 2 * beam_width > self.max_logprobs:
            raise ValueError(f"beam_width={beam_width} needs {2 * beam_width} logprobs a step, more than "
                             f"max_logprobs={self.max_logprobs} allows; start the engine with a larger max_logprobs "
                             f"(-1: no cap).")

    def _bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """Each bad word's tokens as it starts the text and, where that tokenizes as other tokens of the same
        count, after a space (mid-text), as vLLM bans them."""
        if bad_words and self.tokenizer is None:
            raise ValueError("bad_words needs the model's tokenizer (skip_tokenizer_init is set).")
        sequences: list[list[int]] = []
        for word in bad_words:
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if not alone:
                raise ValueError(f"bad_words entry {word!r} has no tokens.")
            sequences.append(alone)
            if len(spaced) == len(alone) and spaced[0] != alone[0]:
                sequences.append(spaced)
        return sequences

    def _grammar(self, params: SamplingParams):
        """The compiled grammar of the request's structured outputs, or None. The grammar ends with the model's
        end-of-sequence token (or a stop token), so the request must stop there."""
        if params.structured_outputs is None:
            return None
        if params.ignore_eos or not self.eos_token_ids:
            raise ValueError("Structured outputs end the output with the end-of-sequence token: they cannot be "
                             "combined with ignore_eos" + ("" if self.eos_token_ids else
                                                           ", and this model has no end-of-sequence token") + ".")
        return self.structured.compile(params.structured_outputs)

    def check_priority(self, priority: int) -> int:
        """A request's priority: any integer under the priority policy, else only 0 (vLLM's documented rule:
        a priority the scheduler would ignore is refused, not silently dropped)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(f"Got priority {priority}, but priority scheduling is not enabled: start the engine "
                             f"with scheduling_policy='priority' (--scheduling-policy priority).")
        return priority

    def check_lora(self, lora: LoRARequest | None) -> LoRARequest | None:
        """A request's adapter, checked once at the front door: LoRA must be on, the folder a LoRA adapter the
        engine can apply, and an id always the same folder."""
        if lora is None:
            return None
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}.")
        if self.max_lora_rank is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True (--enable-lora).")
        if self.pooling is not None:
            raise ValueError("LoRA adapters run on generation models only.")
        known = self._adapter_paths.get(lora.lora_int_id)
        if known is None:  # first sight: checked whole (a worker's load must not fail), then trusted by its id
            check_adapter(lora.lora_path, self.hf_config, self.max_lora_rank)
            self._adapter_paths[lora.lora_int_id] = lora.lora_path
        elif known != lora.lora_path:
            raise ValueError(f"lora_int_id {lora.lora_int_id} is already the adapter at {known!r}: give "
                             f"{lora.lora_path!r} an id of its own.")
        return lora

    def make_requests(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                      priority: int = 0, reasoning_ended: bool | None = None,
                      lora_request: LoRARequest | None = None) -> list[Request]:
        """One request per completion: n > 1 fans out into n requests sharing the prompt (and so, through
        the prefix cache, its KV blocks), and the priority. A pooling request is one request.
        `reasoning_ended` (the chat server's, which knows the request's chat-template arguments): whether a
        reasoning model's thinking is over before the output starts; None: the engine's parser reads the prompt."""
        priority = self.check_priority(priority)
        if isinstance(params, PoolingParams):
            params = self.verify_pooling_params(params)
            prompt = self.process_pooling_prompt(prompt, params)
            return [Request(request_id, prompt.token_ids, None, prompt=prompt.text, pooling_params=params,
                            token_type_ids=prompt.token_type_ids, priority=priority)]
        prompt = self.process_prompt(prompt)
        params = self.validate_params(params)
        lora_request = self.check_lora(lora_request)
        grammar = self._grammar(params)
        if prompt.embeds is not None and params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs are not available for prompt embeddings (there are no prompt tokens).")
        ids = prompt.token_ids
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        if params.n == 1:
            children = [Request(request_id, ids, params, prompt=prompt.text, prompt_embeds=prompt.embeds,
                                priority=priority, cache_salt=prompt.cache_salt, lora_request=lora_request)]
        else:
            children = []
            for i in range(params.n):
                child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
                children.append(Request(f"{i}_{request_id}", ids, child_params, prompt=prompt.text, index=i,
                                        parent_id=request_id, prompt_embeds=prompt.embeds, priority=priority,
                                        cache_salt=prompt.cache_salt, lora_request=lora_request))
        if grammar is not None:  # each completion walks the grammar on its own
            if self.reasoner is not None and reasoning_ended is None:
                reasoning_ended = self.reasoner.is_reasoning_end(ids)
            for child in children:
                child.grammar = self.structured.matcher(grammar, params.all_stop_token_ids | set(params.stop_token_ids))
                child.reasoning_ended = self.reasoner is None or reasoning_ended
        return children

    # pooling ----------------------------------------------------------------------------------------

    def verify_pooling_params(self, params: PoolingParams) -> PoolingParams:
        """A copy with the task set and the model's defaults filled in; refuses what the model cannot do."""
        pooling = self.pooling
        if pooling is None:
            raise ValueError("This model runs with runner='generate': embedding, classification and scoring "
                             "need a pooling model. Create the LLM with runner='pooling' (convert='embed', "
                             "'classify' or 'reward' turns a causal LM into one).")
        if not isinstance(params, PoolingParams):
            raise TypeError(f"Expected PoolingParams, got {type(params).__name__}.")
        task = params.task or pooling.default_task
        if task not in pooling.tasks:
            raise ValueError(f"This model does not serve the {task!r} pooling task; it serves "
                             f"{', '.join(pooling.tasks)}.")
        allowed = TASK_PARAMETERS[task]
        unsupported = [name for name in ("dimensions", "use_activation", "step_tag_id", "returned_token_ids")
                       if getattr(params, name) is not None and name not in allowed]
        if unsupported:
            raise ValueError(f"Task {task} only supports {list(allowed)} parameters, does not support "
                             f"{unsupported} parameters.")
        params = params.clone(task=task)
        defaults = pooling.defaults
        if task in ("embed", "token_embed"):
            params.use_activation = defaults.normalize if params.use_activation is None else params.use_activation
            params.dimensions = defaults.dimensions if params.dimensions is None else params.dimensions
            if params.dimensions is not None:
                self._check_matryoshka(params.dimensions)
        else:
            params.use_activation = defaults.use_activation if params.use_activation is None \
                else params.use_activation
        if task == "token_classify":
            step_params = [n for n in ("step_tag_id", "returned_token_ids") if getattr(params, n) is not None]
            if step_params and pooling.token_pooling != "STEP":
                raise ValueError(f"{', '.join(step_params)} need STEP pooling (pooler_config="
                                 f"{{'pooling_type': 'STEP'}}).")
            if pooling.token_pooling == "STEP":
                params.step_tag_id = defaults.step_tag_id if params.step_tag_id is None else params.step_tag_id
                params.returned_token_ids = defaults.returned_token_ids if params.returned_token_ids is None \
                    else params.returned_token_ids
        self._truncation_length(params.truncate_prompt_tokens)  # a size beyond the model: refused before tokenizing
        return params

    def _check_matryoshka(self, dimensions: int) -> None:
        allowed = getattr(self.hf_config, "matryoshka_dimensions", None)
        if not getattr(self.hf_config, "is_matryoshka", False) and allowed is None:
            raise ValueError(f'Model "{self.model_name}" does not support matryoshka representation, changing '
                             f'output dimensions will lead to poor results.')
        if allowed is not None and dimensions not in allowed:
            raise ValueError(f'Model "{self.model_name}" only supports {list(allowed)} matryoshka dimensions, use '
                             f'other output dimensions will lead to poor results.')

    def _truncation_length(self, k: int | None, generate: bool = False) -> int | None:
        """How many tokens `truncate_prompt_tokens=k` keeps: -1, the model's length (less one for a generation
        prompt, so a token can still be generated, as in vLLM)."""
        if k is None:
            return None
        if k == -1:
            return self.max_model_len - 1 if generate else self.max_model_len
        if k > self.max_model_len:
            raise ParameterError(f"truncate_prompt_tokens={k} cannot be greater than max_model_len = "
                                 f"{self.max_model_len}. Please request a smaller truncation size.",
                                 "truncate_prompt_tokens", k)
        return k

    def model_prompts(self) -> dict[str, str]:
        """The model's named prompts: Sentence Transformers' and the config's `task_instructions`."""
        st = self.pooling.sentence_transformers if self.pooling is not None else None
        instructions = getattr(self.hf_config, "task_instructions", None)
        return {**(st.prompts if st is not None else {}),
                **(instructions if isinstance(instructions, dict) else {})}

    def named_prompt(self, prompt: PromptType, prompt_name: str | None) -> PromptType:
        """The prompt with the model's prompt `prompt_name` put before its text: Sentence Transformers'
        (config_sentence_transformers.json `prompts`) or the config's `task_instructions`. With no name given,
        the model's `default_prompt_name`, if any."""
        st = self.pooling.sentence_transformers if self.pooling is not None else None
        prompts = self.model_prompts()
        if prompt_name is None:
            prompt_name = st.default_prompt_name if st is not None else None
            is_text = isinstance(prompt, str) or isinstance(prompt, dict) and "prompt" in prompt \
                and "prompt_token_ids" not in prompt
            if prompt_name is None or not is_text:
                return prompt  # a default prompt applies to text only
        if prompt_name not in prompts:
            known = f"its prompts are {', '.join(map(repr, prompts))}" if prompts else \
                "it defines no prompts (config_sentence_transformers.json or task_instructions)"
            raise ValueError(f"Unknown prompt name {prompt_name!r} for this model: {known}.")
        if isinstance(prompt, str):
            return prompts[prompt_name] + prompt
        if isinstance(prompt, dict) and "prompt" in prompt and "prompt_token_ids" not in prompt:
            return {**prompt, "prompt": prompts[prompt_name] + prompt["prompt"]}
        raise ValueError("A named prompt applies to text prompts; this prompt is given as token ids or embeddings.")

    def process_pooling_prompts(self, prompts: list[PromptType | ProcessedPrompt], params: list[PoolingParams],
                                prompt_name: str | None = None) -> list[ProcessedPrompt]:
        """Tokenized (and truncated, with `truncate_prompt_tokens`) and validated for a pooling model. Texts
        go to the tokenizer together, one call per truncation: for short texts the per-call overhead costs
        more than the tokenizing."""
        out: list[ProcessedPrompt | None] = [None] * len(prompts)
        texts: dict[tuple, list[tuple[int, str]]] = {}  # (truncation length, side) -> (position, text)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, ProcessedPrompt):
                out[i] = prompt
                continue
            if isinstance(prompt, dict) and "prompt_embeds" in prompt:
                raise ValueError("Pooling models take text or token prompts, not prompt embeddings.")
            text, ids = self._split_prompt(self.named_prompt(prompt, prompt_name))
            truncation = (self._truncation_length(p.truncate_prompt_tokens), self._truncation_side(p.truncation_side))
            max_length, side = truncation
            if ids is None:
                text = self._checked_text(text, side if max_length is not None else None)
                texts.setdefault(truncation, []).append((i, text))
                continue
            if max_length is not None and isinstance(ids, (list, tuple)) and len(ids) > max_length:
                ids = ids[-max_length:] if side == "left" else ids[:max_length]  # token ids: no special tokens
            out[i] = ProcessedPrompt(text, self._check_pooling_length(ids))
        for (max_length, side), items in texts.items():
            for (i, _), processed in zip(items, self._encode([t for _, t in items], None, max_length, side)):
                out[i] = processed
        return out

    def process_pooling_prompt(self, prompt: PromptType | ProcessedPrompt, params: PoolingParams,
                               prompt_name: str | None = None) -> ProcessedPrompt:
        return self.process_pooling_prompts([prompt], [params], prompt_name)[0]

    def process_pooling_pairs(self, pairs: list[tuple[str, str]], params: PoolingParams) -> list[ProcessedPrompt]:
        """Sentence pairs for a cross-encoder, each tokenized jointly (with token types where the model has
        them)."""
        for pair in pairs:
            if not all(isinstance(text, str) and text for text in pair):
                raise ValueError("A cross-encoder scores pairs of non-empty text prompts.")
        return self._encode([a for a, _ in pairs], [b for _, b in pairs],
                            self._truncation_length(params.truncate_prompt_tokens))

    def _truncation_side(self, side: str | None) -> str:
        return side or getattr(self.tokenizer, "truncation_side", None) or "right"

    def _encode(self, texts: list[str], text_pairs: list[str] | None, max_length: int | None,
                side: str = "right") -> list[ProcessedPrompt]:
        """Texts (or text pairs) through the tokenizer. A single text over `max_length` loses content tokens
        on `side` (the tokenizer's own truncation only cuts the side it was built with); a pair is cut by the
        tokenizer, longest text first."""
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer; pass prompt_token_ids instead.")
        st = self.pooling.sentence_transformers
        lower = st is not None and st.do_lower_case
        given = [t.lower() for t in texts] if lower else texts
        if text_pairs is not None:
            encoded = self.tokenizer(given, [t.lower() for t in text_pairs] if lower else text_pairs,
                                     truncation=max_length is not None, max_length=max_length)
        else:
            encoded = self.tokenizer(given, return_special_tokens_mask=max_length is not None)
        all_ids, token_types = encoded["input_ids"], None
        # Token types only for a model that has them, and only where some token is not type 0.
        if getattr(self.hf_config, "type_vocab_size", 0) > 1:
            token_types = encoded.get("token_type_ids")
        if text_pairs is None and max_length is not None:
            keep = [_kept(mask, max_length, side) for mask in encoded["special_tokens_mask"]]
            all_ids = [[t for t, k in zip(ids, kept) if k] for ids, kept in zip(all_ids, keep)]
            if token_types:
                token_types = [[t for t, k in zip(tt, kept) if k] for tt, kept in zip(token_types, keep)]
        return [ProcessedPrompt(texts[j] if text_pairs is None else None, self._check_pooling_length(ids),
                                token_type_ids=token_types[j] if token_types and any(token_types[j]) else None)
                for j, ids in enumerate(all_ids)]

    def _check_pooling_length(self, ids: list[int]) -> list[int]:
        if isinstance(ids, (list, tuple)) and len(ids) > self.max_model_len:
            raise self._too_long(len(ids), " (Or pass truncate_prompt_tokens=-1 to truncate it.)")
        return self.validate_token_ids(ids)


def _kept(special_mask: list, max_length: int, side: str) -> list[bool]:
    """Which tokens stay when a sequence is cut to `max_length`: content tokens go from `side`, special
    tokens (mask 1) stay."""
    excess = len(special_mask) - max_length
    if excess <= 0:
        return [True] * len(special_mask)
    content = [i for i, special in enumerate(special_mask) if not special]
    dropped = set(content[:excess] if side == "left" else content[-excess:])
    return [i not in dropped for i in range(len(special_mask))]
