"""Beam search: each step asks the engine for the top 2 × beam_width logprobs of the next token of every live
beam of every prompt, in one batch; the best beam_width non-finished extensions of each prompt live on.

How a step runs is the caller's `step`. `EngineBeamStepper` (offline) and `AsyncEngineBeamStepper` (the
server) have the engine keep each beam's KV blocks after its step and fork every extension from them: full
blocks shared, a partial last block copied, so a step computes exactly one token per beam. (vLLM steps
with one-token `generate` calls instead; beams then share only full blocks, through the prefix cache, and
recompute their partial last block every step.)
"""
from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from shardserve.inputs import TokensPrompt
from shardserve.lora.request import LoRARequest
from shardserve.outputs import PositionLogprobs
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
    lora_request: LoRARequest | None = None  # the adapter its prompt runs through, as vLLM's beams carry it
    # The beam this one extends, until its step runs; the engine request holding this beam's KV after it.
    parent: BeamSearchSequence | None = field(default=None, repr=False, compare=False)
    request_id: str | None = field(default=None, repr=False, compare=False)


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
                                       beam.cum_logprob + logprob.logprob, lora_request=beam.lora_request,
                                       parent=beam)
            if token_id == eos_token_id:
                child.finish_reason = "stop"
                finished.append(child)
            else:
                live.append(child)
    live.sort(key=lambda b: b.cum_logprob, reverse=True)
    return live[:beam_width], finished


BeamStep = Callable[[list[BeamSearchSequence], SamplingParams], list[PositionLogprobs]]


class EngineBeamStepper:
    """Steps beams on an `LLMEngine` that keeps each beam's KV blocks (`hold_kv`) after its step, forking
    every extension from them; `close` frees what the last step held. The beams have the search's `priority`
    and `cache_salt`."""

    def __init__(self, engine, priority: int = 0, cache_salt: str | None = None):
        self.engine = engine
        self.priority = priority
        self.salt = {"cache_salt": cache_salt} if cache_salt is not None else {}
        self.held: list[str] = []
        self._prefix = f"beam-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count()

    def _start(self, beams: list[BeamSearchSequence], params: SamplingParams) -> list:
        """Queue every beam's request (a fork of the beam it extends), then free the previous step's blocks:
        the forks hold what they share. Returns what the engine returned for each."""
        handles = []
        for beam in beams:
            request_id = f"{self._prefix}-{next(self._ids)}"
            if beam.parent is None:
                prompt = TokensPrompt(prompt_token_ids=beam.tokens, **self.salt)
                handles.append(self.engine.add_request(request_id, prompt, params, hold_kv=True,
                                                       priority=self.priority, lora_request=beam.lora_request))
            else:  # a fork runs through its parent's adapter
                handles.append(self.engine.fork_request(request_id, beam.parent.request_id, beam.tokens[-1],
                                                        params))
            beam.request_id, beam.parent = request_id, None
        self.engine.release_requests(self.held)
        self.held = [beam.request_id for beam in beams]
        return handles

    def __call__(self, beams: list[BeamSearchSequence], params: SamplingParams) -> list[PositionLogprobs]:
        self._start(beams, params)
        outputs = {}
        while len(outputs) < len(beams):
            for out in self.engine.step():
                if out.finished:
                    outputs[out.request_id] = out
        return [outputs[beam.request_id].outputs[0].logprobs[0] for beam in beams]

    def close(self) -> None:
        self.engine.release_requests(self.held)
        self.held = []


class AsyncEngineBeamStepper(EngineBeamStepper):
    """The same steps on an `AsyncLLMEngine` (the server), called from the thread that runs the search while
    the engine's outputs arrive on `loop`."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, priority: int = 0, cache_salt: str | None = None):
        super().__init__(engine, priority, cache_salt)
        self.loop = loop

    def __call__(self, beams: list[BeamSearchSequence], params: SamplingParams) -> list[PositionLogprobs]:
        return asyncio.run_coroutine_threadsafe(self._step(beams, params), self.loop).result()

    async def _step(self, beams: list[BeamSearchSequence], params: SamplingParams) -> list[PositionLogprobs]:
        async def final(outputs):
            last = None
            async for last in outputs:
                pass
            return last
        finals = await asyncio.gather(*(final(o) for o in self._start(beams, params)))
        return [out.outputs[0].logprobs[0] for out in finals]


def run_beam_search(step: BeamStep, prompts: list[list[int]], params: BeamSearchParams, tokenizer,
                    max_model_len: int, use_tqdm: bool = False,
                    lora_requests: list[LoRARequest | None] | None = None) -> list[BeamSearchOutput]:
    """`step` gives, for each beam, the logprobs of its next token; `lora_requests`: each prompt's adapter."""
    eos = None if params.ignore_eos or tokenizer is None else tokenizer.eos_token_id
    step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                                 ignore_eos=True, detokenize=False)
    lora_requests = lora_requests or [None] * len(prompts)
    running = [[BeamSearchSequence(tokens=list(p), lora_request=lora)] for p, lora in zip(prompts, lora_requests)]
    finished: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        for i, beams in enumerate(running):  # beams that reached max_model_len end here
            finished[i].extend(b for b in beams if len(b.tokens) >= max_model_len)
            running[i] = [b for b in beams if len(b.tokens) < max_model_len]
        live = [(i, beam) for i, beams in enumerate(running) for beam in beams]
        if not live:
            break
        step_logprobs = step([beam for _, beam in live], step_params)
        by_prompt: list[list] = [[] for _ in running]
        for (i, beam), logprobs in zip(live, step_logprobs):
            by_prompt[i].append((beam, logprobs))
        for i, mine in enumerate(by_prompt):
            if mine:
                running[i], ended = extend_beams([b for b, _ in mine], [lp for _, lp in mine], params.beam_width, eos)
                finished[i].extend(ended)
    results = []
    for prompt_beams, done in zip(running, finished):
        best = sorted(done + prompt_beams, reverse=True,
                      key=lambda b: beam_search_score(b, eos, params.length_penalty))[:params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=True) if tokenizer else None
        results.append(BeamSearchOutput(sequences=best))
    return results
