"""Beam search on top of `LLM.generate`, as vLLM does it.

Each step asks the engine for one token and the top 2 × beam_width logprobs of every live beam of every
prompt, in one batched `generate` call; the best beam_width non-finished extensions of each prompt live
on. Beams of a prompt share their common prefix's KV blocks through the prefix cache (reference-counted
full blocks), so memory grows with the tokens in which beams differ, not with beam_width × length.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from shardserve.outputs import PositionLogprobs, RequestOutput
from shardserve.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")


@dataclass
class BeamSearchSequence:
    """A beam: `tokens` holds the prompt and the generated tokens, `text` their decoding."""
    tokens: list[int]
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_search_score(beam: BeamSearchSequence, eos_token_id: int | None, length_penalty: float) -> float:
    """Cumulative logprob over length ** length_penalty (vLLM's definition: the length counts the prompt,
    not a final EOS)."""
    length = len(beam.tokens) - (1 if eos_token_id is not None and beam.tokens[-1] == eos_token_id else 0)
    return beam.cum_logprob / (length ** length_penalty)


def extend_beams(beams: list[BeamSearchSequence], step_logprobs: list[PositionLogprobs], beam_width: int,
                 eos_token_id: int | None) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """One step for one prompt: (the beam_width best live extensions, the extensions that ended in EOS)."""
    live, finished = [], []
    for beam, logprobs in zip(beams, step_logprobs):
        for token_id, logprob in logprobs.items():
            child = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [logprobs],
                                       beam.cum_logprob + logprob.logprob)
            if token_id == eos_token_id:
                child.finish_reason = "stop"
                finished.append(child)
            else:
                live.append(child)
    live.sort(key=lambda b: b.cum_logprob, reverse=True)
    return live[:beam_width], finished


def run_beam_search(step: Callable[[list[list[int]], SamplingParams], list[RequestOutput]],
                    prompts: list[list[int]], params: BeamSearchParams, tokenizer, max_model_len: int,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """`step` generates one token for each given sequence (a batched `LLM.generate`)."""
    eos = None if params.ignore_eos or tokenizer is None else tokenizer.eos_token_id
    step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                                 ignore_eos=True, detokenize=False)
    running = [[BeamSearchSequence(tokens=list(p))] for p in prompts]
    finished: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        for i, beams in enumerate(running):  # beams that reached max_model_len end here
            finished[i].extend(b for b in beams if len(b.tokens) >= max_model_len)
            running[i] = [b for b in beams if len(b.tokens) < max_model_len]
        live = [(i, beam) for i, beams in enumerate(running) for beam in beams]
        if not live:
            break
        outs = step([beam.tokens for _, beam in live], step_params)
        by_prompt: list[list] = [[] for _ in running]
        for (i, beam), out in zip(live, outs):
            by_prompt[i].append((beam, out.outputs[0].logprobs[0]))
        for i, mine in enumerate(by_prompt):
            if mine:
                running[i], ended = extend_beams([b for b, _ in mine], [lp for _, lp in mine], params.beam_width, eos)
                finished[i].extend(ended)
    results = []
    for prompt_beams, done in zip(running, finished):
        for beam in done + prompt_beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(done + prompt_beams, reverse=True,
                      key=lambda b: beam_search_score(b, eos, params.length_penalty))[:params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=True) if tokenizer else None
        results.append(BeamSearchOutput(sequences=best))
    return results
