"""`LLM`'s methods for pooling models (runner="pooling"): encode, embed, classify, score, reward.

Each builds PoolingParams for its task, has the processor tokenize and check every prompt before anything
is queued, and runs the requests through the same engine loop as `generate`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F

from shardserve.inputs import PromptType
from shardserve.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingRequestOutput,
                                ScoringOutput, ScoringRequestOutput)
from shardserve.pooling_params import PoolingParams


def _as_list(prompts) -> list:
    return [prompts] if isinstance(prompts, (str, dict)) else list(prompts)


class PoolingMixin:
    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               truncate_prompt_tokens: int | None = None, use_tqdm: bool = True, pooling_task: str | None = None,
               prompt_name: str | None = None) -> list[PoolingRequestOutput]:
        """The raw pooler output (`outputs.data`, a tensor) of each prompt for `pooling_task` ("embed",
        "classify", "score", "token_embed", "token_classify"; default: the model's first task).
        `prompt_name` puts the model's Sentence Transformers prompt of that name before each text."""
        prompts = _as_list(prompts)
        params = self._pooling_params(pooling_params, len(prompts), pooling_task, truncate_prompt_tokens)
        processed = self.llm_engine.processor.process_pooling_prompts(prompts, params, prompt_name)
        return self._run_requests(processed, params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              prompt_name: str | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`)."""
        outputs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                              use_tqdm=use_tqdm, pooling_task="embed", prompt_name=prompt_name)
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
                 truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (`outputs.probs`)."""
        outputs = self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                              use_tqdm=use_tqdm, pooling_task="classify")
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def reward(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               truncate_prompt_tokens: int | None = None, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """A reward model's per-token outputs (`outputs.data`, [tokens, ...])."""
        return self.encode(prompts, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                           use_tqdm=use_tqdm, pooling_task="token_classify")

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], /, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """Similarity of text pairs: one text against each of `data_2`, or `data_1[i]` against `data_2[i]`.
        A cross-encoder reads each pair jointly; an embedding model embeds both sides and compares them by
        cosine similarity."""
        data_1, data_2 = _as_list(data_1), _as_list(data_2)
        if not data_1 or not data_2:
            raise ValueError("LLM.score needs at least one text on each side.")
        if len(data_1) > 1 and len(data_1) != len(data_2):
            raise ValueError(f"LLM.score got {len(data_1)} texts against {len(data_2)}: pass one text to score "
                             f"against all of data_2, or as many texts as data_2 to score them pairwise.")
        pooling = self.llm_engine.processor.pooling
        tasks = pooling.tasks if pooling is not None else ()
        if "score" not in tasks and "embed" in tasks:
            return self._embedding_score(data_1, data_2, truncate_prompt_tokens, use_tqdm, pooling_params)
        # (the processor refuses a model that neither cross-encodes nor embeds, naming what it does)
        return self._cross_encode(data_1 * len(data_2) if len(data_1) == 1 else data_1, data_2,
                                  truncate_prompt_tokens, use_tqdm, pooling_params)

    def _cross_encode(self, data_1, data_2, truncate_prompt_tokens, use_tqdm, pooling_params):
        (params,) = self._pooling_params(pooling_params, 1, "score", truncate_prompt_tokens)
        processor = self.llm_engine.processor
        texts = [[p["prompt"] if isinstance(p, dict) and "prompt" in p else p for p in side]
                 for side in (data_1, data_2)]
        processed = processor.process_pooling_pairs(list(zip(*texts)), params)
        outputs = self._run_requests(processed, [params] * len(processed), use_tqdm)
        return [ScoringRequestOutput.from_base(o) for o in outputs]

    def _embedding_score(self, data_1, data_2, truncate_prompt_tokens, use_tqdm, pooling_params):
        embeddings = self.encode(data_1 + data_2, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens,
                                 use_tqdm=use_tqdm, pooling_task="embed")
        first, second = embeddings[:len(data_1)], embeddings[len(data_1):]
        if len(first) == 1:
            first = first * len(second)
        tokenizer = self.get_tokenizer()
        pad = [] if tokenizer is None or tokenizer.pad_token_id is None else [tokenizer.pad_token_id]
        return [ScoringRequestOutput(
            f"{a.request_id}_{b.request_id}",
            ScoringOutput(F.cosine_similarity(a.outputs.data, b.outputs.data, dim=0).item()),
            a.prompt_token_ids + pad + b.prompt_token_ids) for a, b in zip(first, second)]

    def _pooling_params(self, pooling_params, num_prompts: int, task: str | None,
                        truncate_prompt_tokens: int | None) -> list[PoolingParams]:
        """One verified PoolingParams per prompt, for `task`, with the call's truncation."""
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * num_prompts
        else:
            params = list(pooling_params)
            if len(params) != num_prompts:
                raise ValueError(f"Got {len(params)} PoolingParams for {num_prompts} prompts; pass one, or one per "
                                 f"prompt.")
        verified: dict[int, PoolingParams] = {}  # one check per distinct PoolingParams, however many prompts
        for p in params:
            if id(p) in verified:
                continue
            if not isinstance(p, PoolingParams):
                raise TypeError(f"Expected PoolingParams, got {type(p).__name__}.")
            if task is not None and p.task not in (None, task):
                raise ValueError(f"PoolingParams(task={p.task!r}) given to a call for the {task!r} task.")
            changes = {"task": task or p.task}
            if truncate_prompt_tokens is not None:
                changes["truncate_prompt_tokens"] = truncate_prompt_tokens
            verified[id(p)] = self.llm_engine.processor.verify_pooling_params(p.clone(**changes))
        return [verified[id(p)] for p in params]
