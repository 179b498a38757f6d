"""Speculative decoding by n-gram lookup (engine/speculative.py), against the engine without it.

The random test models fall into loops under greedy decoding, which is what n-gram lookup feeds on: every test
that compares outputs also checks that drafts were accepted, so the path it proves did run.
"""
from __future__ import annotations

import random

import pytest

from shardserve import LLM, SamplingParams
from shardserve.config import EngineConfig
from shardserve.engine.request import Request
from shardserve.engine.speculative import NgramProposer, SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = ["the cat sat on the mat and the cat sat on the mat and the", "1 2 3 4 1 2 3 4 1 2 3", "hello world",
           "Hello, world! Streaming text one token at a time is how servers answer."]
ENGINE = dict(dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 26)


def brute_force_drafts(tokens: list[int], k: int, low: int, high: int) -> list[int]:
    """vLLM's choice, written out: the longest n in [low, high] whose n-gram ends the sequence and occurs earlier,
    and the k tokens after its earliest earlier occurrence."""
    for n in range(min(high, len(tokens) - 1), low - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_lookup_picks_vllms_match():
    rng = random.Random(0)
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=4, prompt_lookup_min=2))
    for trial in range(400):
        tokens = [rng.randrange(3 if trial % 2 else 8) for _ in range(rng.randrange(1, 60))]
        req = Request(str(trial), tokens, SamplingParams())
        assert proposer.propose(req, 3) == brute_force_drafts(tokens, 3, 2, 4), tokens
        # the request's token array follows its tokens as they grow, reading only the new ones
        req.append_token(tokens[0])
        assert proposer.propose(req, 2) == brute_force_drafts(req.all_token_ids, 2, 2, 4)
    assert proposer.propose(Request("long", [7] * 1000, SamplingParams()), 0) == []


def test_config_takes_vllms_dict_with_its_defaults():
    parse = SpeculativeConfig.parse
    assert parse({"method": "ngram", "num_speculative_tokens": 3}) == SpeculativeConfig(3, 5, 5)
    assert parse({"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 4}) == \
        SpeculativeConfig(2, 4, 4)
    assert parse({"num_speculative_tokens": 2, "prompt_lookup_min": 2}) == SpeculativeConfig(2, 2, 2)
    assert EngineConfig(model="m", speculative_config={"method": "ngram", "num_speculative_tokens": 1}) \
        .speculative_config == SpeculativeConfig(1, 5, 5)
    # vLLM's dynamic schedule: drafts by batch size (gaps keep the range before; past the last, the last's)
    dynamic = parse({"method": "ngram", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size":
                     [[9, 16, 1], [1, 4, 6], [5, 8, 2], [32, 64, 0]]})
    assert [dynamic.max_drafts(n) for n in (1, 4, 5, 8, 9, 16, 17, 31, 32, 100)] == [4, 4, 2, 2, 1, 1, 1, 1, 0, 0]
    assert parse({"num_speculative_tokens": 3}).max_drafts(1000) == 3
    for bad, message in (({"method": "ngram"}, "needs num_speculative_tokens"),
                         ({"num_speculative_tokens": 2, "num_speculative_tokens_per_batch_size": [[2, 8, 1]]},
                          "must start at 1"),
                         ({"num_speculative_tokens": 2, "num_speculative_tokens_per_batch_size": [[1, 8, 1],
                                                                                                   [8, 9, 1]]},
                          "must not overlap"),
                         ({"num_speculative_tokens": 2, "num_speculative_tokens_per_batch_size": [[1, 8]]},
                          "must be 3 integers"),
                         ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' is not built"),
                         ({"method": "ngram", "num_speculative_tokens": 0}, "must be a positive integer"),
                         ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                           "prompt_lookup_max": 2}, "prompt_lookup_min=4 must be <= prompt_lookup_max=2"),
                         ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
                          "got draft_tensor_parallel_size")):
        with pytest.raises(ValueError, match=message):
            parse(bad)


def test_a_pooling_model_refuses_speculative_config(model_dirs):
    with pytest.raises(ValueError, match="speculative_config applies to generation"):
        LLM(model_dirs("llama"), runner="pooling", speculative_config=NGRAM)


@pytest.fixture(scope="module")
def engines(model_dirs):
    """The same model without and with speculative decoding."""
    plain, spec = LLM(model_dirs("llama"), **ENGINE), LLM(model_dirs("llama"), speculative_config=NGRAM, **ENGINE)
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def _accepted(llm: LLM) -> int:
    return llm.llm_engine.spec_decode_stats.num_accepted_tokens


def _assert_same(got, ref, logprobs: bool = False) -> None:
    for g, r in zip(got, ref):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].text == r.outputs[0].text
        assert (g.outputs[0].finish_reason, g.outputs[0].stop_reason) == \
            (r.outputs[0].finish_reason, r.outputs[0].stop_reason)
        if logprobs:
            assert g.outputs[0].cumulative_logprob == pytest.approx(r.outputs[0].cumulative_logprob, abs=1e-3)
            for a, b in zip(g.outputs[0].logprobs, r.outputs[0].logprobs):
                assert list(a) == list(b)   # the same tokens, in the same order (sampled, then by rank)
                assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)
                assert [x.rank for x in a.values()] == [x.rank for x in b.values()]


def test_greedy_outputs_and_logprobs_are_the_models_own(engines):
    plain, spec = engines
    for params in (SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=30, temperature=0,
                                                                                logprobs=3),
                   # sampled, but from one token: every row of a verification step samples as a plain step would
                   SamplingParams(max_tokens=30, temperature=1.3, top_k=1),
                   SamplingParams(max_tokens=7, temperature=0)):
        before = _accepted(spec)
        _assert_same(spec.generate(PROMPTS, params, use_tqdm=False), plain.generate(PROMPTS, params, use_tqdm=False),
                     logprobs=params.logprobs is not None)
        assert _accepted(spec) > before


def test_a_stop_inside_the_accepted_drafts_ends_the_request_there(engines):
    """Stop tokens and stop strings among a step's accepted tokens end the output at them: the rest of the
    step's tokens are dropped, as if each had been decoded alone."""
    plain, spec = engines
    long = plain.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)
    stop_ids = [o.outputs[0].token_ids[25] for o in long]
    stop_texts = [o.outputs[0].text[30:33] for o in long]
    for params in [SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[t]) for t in stop_ids] + \
            [SamplingParams(max_tokens=40, temperature=0, stop=[t]) for t in stop_texts if t.strip()]:
        ref = plain.generate(PROMPTS, params, use_tqdm=False)
        assert any(o.outputs[0].finish_reason == "stop" for o in ref)
        _assert_same(spec.generate(PROMPTS, params, use_tqdm=False), ref)


def test_rules_that_read_the_output_count_the_drafts_before_each_position(engines):
    """Penalties, min_tokens, bad words, logit bias and allowed tokens with drafts: each row is sampled under the
    rules a plain step at its position would apply (the drafts before it counted as output), so greedy answers are
    those without speculation (a penalty that missed a draft would change them), and drafts were accepted."""
    plain, spec = engines
    reference = plain.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)
    early = [o.outputs[0].token_ids[3] for o in reference]   # stop tokens that min_tokens holds back
    common = sorted({t for o in reference for t in o.outputs[0].token_ids})
    for params in (SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.2),
                   SamplingParams(max_tokens=40, temperature=0, frequency_penalty=0.1, presence_penalty=0.05),
                   SamplingParams(max_tokens=40, temperature=0, min_tokens=12, stop_token_ids=early),
                   SamplingParams(max_tokens=40, temperature=0, bad_words=["the", "1 2"]),
                   SamplingParams(max_tokens=40, temperature=0, logit_bias={common[0]: 2.0, common[1]: -3.0}),
                   SamplingParams(max_tokens=40, temperature=0, allowed_token_ids=common[:40])):
        before = _accepted(spec)
        _assert_same(spec.generate(PROMPTS, params, use_tqdm=False), plain.generate(PROMPTS, params, use_tqdm=False))
        assert _accepted(spec) > before, params


def test_seeded_and_constrained_requests_take_no_drafts(engines):
    """A seeded sampled request decodes one token a step (its draws must not depend on what drafts were
    accepted) and answers as without speculation; a structured request too, beside requests that draft in the
    same steps."""
    from shardserve import StructuredOutputsParams
    plain, spec = engines
    seeded = SamplingParams(max_tokens=24, temperature=0.9, seed=7)
    drafted = spec.llm_engine.spec_decode_stats.num_draft_tokens
    _assert_same(spec.generate(PROMPTS, seeded, use_tqdm=False), plain.generate(PROMPTS, seeded, use_tqdm=False))
    assert spec.llm_engine.spec_decode_stats.num_draft_tokens == drafted
    greedy = SamplingParams(max_tokens=40, temperature=0)
    mixed = [greedy, greedy.clone(structured_outputs=StructuredOutputsParams(regex="[a-z ]{3,30}[.]")), greedy,
             seeded]
    before = _accepted(spec)
    _assert_same(spec.generate(PROMPTS, mixed, use_tqdm=False), plain.generate(PROMPTS, mixed, use_tqdm=False))
    assert _accepted(spec) > before


def test_unseeded_sampling_accepts_drafts_and_keeps_to_its_top_k(engines):
    """Sampled requests verify drafts too; each token still comes from the request's own top-k of the model's
    logits at its position (the logprobs' ranks say so)."""
    _, spec = engines
    before = _accepted(spec)
    outputs = spec.generate(PROMPTS * 4, SamplingParams(max_tokens=40, temperature=0.7, top_k=3, logprobs=0),
                            use_tqdm=False)
    assert _accepted(spec) > before
    for o in outputs:
        assert len(o.outputs[0].token_ids) == 40 or o.outputs[0].finish_reason == "stop"
        assert all(entry[t].rank <= 3 for t, entry in zip(o.outputs[0].token_ids, o.outputs[0].logprobs))


def test_preemption_and_prefix_cache_with_drafts(model_dirs, engines):
    """A KV cache too small for the batch preempts requests that hold drafts' slots; the rejected drafts' slots
    are written again, and blocks shared through the prefix cache hold only accepted tokens."""
    plain, _ = engines
    params = SamplingParams(max_tokens=60, temperature=0)
    prompts = [p + " " + str(i) for i in range(3) for p in PROMPTS]
    ref = plain.generate(prompts, params, use_tqdm=False)
    small = LLM(model_dirs("llama"), speculative_config=NGRAM, block_size=4, num_gpu_blocks_override=48,
                max_model_len=160, **ENGINE)
    try:
        for _ in range(2):   # the second time over blocks the prefix cache kept
            _assert_same(small.generate(prompts, params, use_tqdm=False), ref)
        assert small.llm_engine.scheduler.num_preemptions > 0
        assert _accepted(small) > 0
    finally:
        small.shutdown()


def test_drafts_stop_short_of_max_tokens_and_max_model_len(model_dirs, engines):
    plain, spec = engines
    for n in (1, 2, 3, 5):
        params = SamplingParams(max_tokens=n, temperature=0)
        _assert_same(spec.generate(PROMPTS, params, use_tqdm=False), plain.generate(PROMPTS, params, use_tqdm=False))
    short = LLM(model_dirs("llama"), speculative_config=NGRAM, max_model_len=100, **ENGINE)
    try:
        for o in short.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0), use_tqdm=False):
            assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 100
    finally:
        short.shutdown()


def test_drafts_fit_the_budget_the_length_and_the_free_blocks():
    """A decode takes up to k drafts after its token, no more than the step's budget leaves, none past its last
    token (max_tokens), and none where its blocks have no room for them: it then decodes alone rather than
    preempt anyone for drafts. The scheduler counts drafts as computed until the engine takes rejected ones back."""
    from shardserve.engine.block_manager import BlockManager
    from shardserve.engine.scheduler import Scheduler

    def decoding(blocks: int, budget: int, max_tokens: int = 100, schedule=None):
        proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=2,
                                                   prompt_lookup_min=1,
                                                   num_speculative_tokens_per_batch_size=schedule))
        scheduler = Scheduler(BlockManager(blocks, 4), max_num_seqs=4, max_num_batched_tokens=64,
                              proposer=proposer)
        req = Request("r", [5, 6, 7, 8, 9, 5, 6, 7], SamplingParams(max_tokens=max_tokens), can_draft=True)
        scheduler.add_request(req)
        (prefill,) = scheduler.schedule().scheduled
        assert prefill.num_draft_tokens == 0 and prefill.sample
        req.num_output_placeholders -= 1
        req.append_token(8)   # ... 5 6 7 8 occurred before: 9 5 6 7 are the drafts
        scheduler.max_num_batched_tokens = budget
        (s,) = scheduler.schedule().scheduled
        return s, req

    s, req = decoding(blocks=8, budget=64)
    assert (s.token_ids, s.num_draft_tokens, s.sample) == ([8, 9, 5, 6, 7], 4, True)
    assert req.num_computed_tokens == 13
    assert decoding(blocks=8, budget=3)[0].token_ids == [8, 9, 5]              # the budget's room
    assert decoding(blocks=8, budget=64, max_tokens=3)[0].token_ids == [8, 9]  # 2 tokens left: one draft
    assert decoding(blocks=8, budget=64, schedule=((1, 1, 2),))[0].token_ids == [8, 9, 5]  # at batch size 1: 2
    assert decoding(blocks=8, budget=64, schedule=((1, 1, 0),))[0].token_ids == [8]
    s, req = decoding(blocks=3, budget=64)   # 9 tokens in 3 blocks of 4: room for 3 more, not 5
    assert (s.token_ids, s.num_draft_tokens, req.num_computed_tokens) == ([8], 0, 9)


def test_a_stream_gets_a_steps_accepted_tokens_in_one_output(model_dirs, engines):
    """The server's engine with speculation: a streamed (DELTA) request gets each step's tokens together, and
    its outputs add up to the offline answer without speculation."""
    import asyncio

    from shardserve.engine.async_engine import AsyncLLMEngine
    from shardserve.sampling_params import RequestOutputKind

    plain, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=40)
    (expected,) = plain.generate(PROMPTS[:1], params, use_tqdm=False)
    engine = AsyncLLMEngine(EngineConfig(model=model_dirs("llama"), dtype="float32", speculative_config=NGRAM))

    async def consume():
        return [(list(out.outputs[0].token_ids), out.outputs[0].text) async for out in
                engine.generate(PROMPTS[0], params.clone(output_kind=RequestOutputKind.DELTA))]
    try:
        deltas = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert [t for ids, _ in deltas for t in ids] == expected.outputs[0].token_ids
    assert "".join(text for _, text in deltas) == expected.outputs[0].text
    assert max(len(ids) for ids, _ in deltas) > 1
