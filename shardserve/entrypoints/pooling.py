"""`LLM`'s methods for pooling models (runner="pooling"): encode, embed, classify, score, reward.

Each builds PoolingParams for its task, has the processor tokenize and check every prompt before anything
is queued, and runs the requests through the same engine loop as `generate`.
"""
from __future__ import annotations

from collections.abc import Sequence

from shardserve.inputs import PromptType
from shardserve.entrypoints.score_utils import plan_scores, score_inputs, score_task
from shardserve.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingRequestOutput,
                                ScoringRequestOutput)
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
        return self._run_requests(processed, params, use_tqdm=use_tqdm)

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
        data_1, data_2 = score_inputs(data_1, data_2)
        processor = self.llm_engine.processor
        (params,) = self._pooling_params(pooling_params, 1, score_task(processor), truncate_prompt_tokens)
        plan = plan_scores(processor, data_1, data_2, params)
        return plan.results(self._run_requests(plan.prompts, [params] * len(plan.prompts), use_tqdm=use_tqdm))

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
