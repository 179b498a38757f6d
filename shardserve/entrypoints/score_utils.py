"""Scoring text pairs, shared by `LLM.score` and the `/score` and `/rerank` routes: which prompts to run
and how their outputs become scores. A cross-encoder reads each pair jointly; an embedding model embeds both
sides once and compares them by cosine similarity."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from shardserve.engine.processor import ProcessedPrompt, Processor
from shardserve.outputs import PoolingRequestOutput, ScoringOutput, ScoringRequestOutput
from shardserve.pooling_params import PoolingParams


def score_inputs(data_1, data_2) -> tuple[list, list]:
    """Both sides as lists: one text against each of `data_2`, or `data_1[i]` against `data_2[i]`."""
    data_1 = [data_1] if isinstance(data_1, (str, dict)) else list(data_1)
    data_2 = [data_2] if isinstance(data_2, (str, dict)) else list(data_2)
    if not data_1 or not data_2:
        raise ValueError("Scoring needs at least one text on each side.")
    if len(data_1) > 1 and len(data_1) != len(data_2):
        raise ValueError(f"Got {len(data_1)} texts to score against {len(data_2)}: give one text to score against "
                         f"all the others, or as many as the others to score them pairwise.")
    return data_1, data_2


def score_task(processor: Processor) -> str:
    """ "score" for a cross-encoder, "embed" for an embedding model that scores by cosine similarity."""
    tasks = processor.pooling.tasks if processor.pooling is not None else ()
    return "embed" if "score" not in tasks and "embed" in tasks else "score"


@dataclass
class ScorePlan:
    prompts: list[ProcessedPrompt]   # the requests to run, all with the same params
    params: PoolingParams
    num_first: int | None            # embedding scoring: prompts[:num_first] are data_1; None: cross-encoder pairs
    pad_token_id: int | None = None

    def results(self, outputs: list[PoolingRequestOutput]) -> list[ScoringRequestOutput]:
        """One score per pair, from the outputs of `prompts` in order."""
        if self.num_first is None:
            return [ScoringRequestOutput.from_base(o) for o in outputs]
        first, second = outputs[:self.num_first], outputs[self.num_first:]
        if len(first) == 1:
            first = first * len(second)
        pad = [] if self.pad_token_id is None else [self.pad_token_id]
        return [ScoringRequestOutput(
            f"{a.request_id}_{b.request_id}",
            ScoringOutput(F.cosine_similarity(a.outputs.data, b.outputs.data, dim=0).item()),
            a.prompt_token_ids + pad + b.prompt_token_ids) for a, b in zip(first, second)]


def plan_scores(processor: Processor, data_1: list, data_2: list, params: PoolingParams) -> ScorePlan:
    """Tokenized, checked prompts for scoring `data_1` against `data_2` (from `score_inputs`) with `params`
    (verified, for `score_task(processor)`)."""
    if params.task == "embed":
        prompts = processor.process_pooling_prompts(data_1 + data_2, [params] * (len(data_1) + len(data_2)))
        tokenizer = processor.tokenizer
        return ScorePlan(prompts, params, len(data_1), getattr(tokenizer, "pad_token_id", None))
    texts = [[p["prompt"] if isinstance(p, dict) and "prompt" in p else p for p in side] for side in (data_1, data_2)]
    if len(texts[0]) == 1:
        texts[0] = texts[0] * len(texts[1])
    return ScorePlan(processor.process_pooling_pairs(list(zip(*texts)), params), params, None)
