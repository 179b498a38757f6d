"""Sampling parameters behave as vLLM documents them, checked against transformers where it has them."""
from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve import LLM, SamplingParams, StructuredOutputsParams, TokensPrompt
from shardserve.layers.attention import triton_backend

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 100, 200, 150, 7, 9, 33, 21, 17, 5, 6]]


@pytest.fixture(scope="module")
def path(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, dtype="float32")


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def gen(llm, prompts, params):
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def greedy_ids(llm, prompt, n=24):
    return gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    a = gen(llm, PROMPTS[:1], params)[0].outputs[0].token_ids
    b = gen(llm, [PROMPTS[1], PROMPTS[0]], [SamplingParams(temperature=0.8, max_tokens=5), params])[1]
    c = gen(llm, PROMPTS[:1], params.clone(seed=99))[0].outputs[0].token_ids
    assert a == b.outputs[0].token_ids
    assert a != c


def test_n_completions_share_a_prompt(llm):
    out = gen(llm, PROMPTS[:1], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = gen(llm, PROMPTS[:1], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in again.outputs]


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    expected = greedy_ids(llm, PROMPTS[1], 16)
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True),
                   SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=16, ignore_eos=True),
                   SamplingParams(temperature=1.0, min_p=1.0, max_tokens=16, ignore_eos=True)):
        assert gen(llm, [PROMPTS[1]], params)[0].outputs[0].token_ids == expected


def test_stop_token_ids(llm):
    expected = greedy_ids(llm, PROMPTS[0])
    stop = expected[5]
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop]))[0].outputs[0]
    first = expected.index(stop)
    assert out.token_ids == expected[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # As vLLM: the stop token is in token_ids, its text is not (unless include_stop_str_in_output), special
    # or not
    tokenizer = llm.get_tokenizer()
    for skip_special in (True, False):
        out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop],
                                                  skip_special_tokens=skip_special))[0].outputs[0]
        assert out.text == tokenizer.decode(expected[:first], skip_special_tokens=skip_special)
    kept = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == tokenizer.decode(expected[:first + 1])


def test_min_tokens_holds_back_stop_tokens(llm):
    expected = greedy_ids(llm, PROMPTS[0])
    stop = expected[0]
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, min_tokens=6,
                                              stop_token_ids=[stop]))[0].outputs[0]
    assert len(out.token_ids) >= 6
    assert stop not in out.token_ids[:6]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop


def test_stop_strings_truncate_text(llm):
    full = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = full[10:13]
    cut = full.index(stop)
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == full[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[:cut + len(stop)]


def test_logprobs_match_transformers(llm, hf):
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    seq = PROMPTS[0] + completion.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
    total = 0.0
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the top token
        assert set(entry) == set(row.topk(3).indices.tolist())
        total += entry[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_max_logprobs_caps_requests_and_minus_one_is_the_whole_vocabulary(llm, path, hf):
    """vLLM's rule: a request may ask for at most max_logprobs (default 20) logprobs or prompt logprobs; -1
    asks for the whole vocabulary, which an engine with max_logprobs=-1 gives."""
    for params, what in ((SamplingParams(logprobs=21), "sample logprobs of 21"),
                         (SamplingParams(prompt_logprobs=-1), "prompt logprobs of")):
        with pytest.raises(ValueError, match=f"Requested {what}.*greater than max allowed: 20"):
            gen(llm, PROMPTS[:1], params)
    assert gen(llm, PROMPTS[:1], SamplingParams(max_tokens=2, logprobs=20))[0].outputs[0].logprobs
    whole = LLM(path, dtype="float32", max_logprobs=-1)
    out = gen(whole, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, logprobs=-1, prompt_logprobs=-1,
                                                 ignore_eos=True))[0]
    vocab = hf.config.vocab_size
    assert [len(entry) for entry in out.outputs[0].logprobs] == [vocab] * 3
    assert [len(entry) for entry in out.prompt_logprobs[1:]] == [vocab] * (len(PROMPTS[0]) - 1)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].log_softmax(-1)
    first = out.outputs[0].logprobs[0]
    assert max(abs(first[t].logprob - ref[t].item()) for t in range(vocab)) < 1e-4


def test_logprob_token_ids_give_those_tokens_logprobs_and_ranks(llm, hf):
    """vLLM's logprob_token_ids: each position lists the sampled token and exactly the given ones, with
    transformers' logprobs and the ranks a whole-vocabulary count gives, beside a request of top logprobs and
    one of none in the same batch (whose answers do not change); bad lists are refused."""
    wanted = [5, 17, 300, 2]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprob_token_ids=wanted),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    outs = gen(llm, [PROMPTS[0]] * 3, params)
    alone = gen(llm, [PROMPTS[0]], params[1])[0].outputs[0]
    assert outs[1].outputs[0].logprobs == alone.logprobs and outs[2].outputs[0].logprobs is None
    completion = outs[0].outputs[0]
    assert completion.token_ids == alone.token_ids
    seq = PROMPTS[0] + completion.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        assert set(entry) == {token, *wanted}
        for t in wanted:
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert entry[t].rank == int((row >= row[t]).sum())
    for bad, message in ((dict(logprob_token_ids=[1, 10**6]), "out-of-vocab"),
                         (dict(logprob_token_ids=[1, 2], logprobs=3), "logprobs must equal"),
                         (dict(logprob_token_ids=list(range(129))), "greater than max allowed: 128")):
        with pytest.raises(ValueError, match=message):
            gen(llm, PROMPTS[:1], SamplingParams(**bad))


def _first_repetition(tokens: list[int], sizes: range, count: int) -> int | None:
    """The length of the shortest prefix of `tokens` that ends in `count` copies of one pattern of a size in
    `sizes` (a brute-force reading of vLLM's repetition detection), or None."""
    for end in range(1, len(tokens) + 1):
        for size in sizes:
            if size * count <= end and len({tuple(tokens[end - size * (k + 1):end - size * k])
                                            for k in range(count)}) == 1:
                return end
    return None


def test_repetition_detection_ends_a_loop(llm):
    """vLLM's repetition_detection: a generation held to two tokens falls into a loop; with detection it ends
    where its tokens first end in min_count copies of a pattern (finish_reason "repetition"), the tokens before
    that as without it. Off (max_pattern_size 0) changes nothing; bad settings are refused."""
    def loop(**more):
        return SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, allowed_token_ids=[40, 41],
                              extra_args={"caller": "kept"}, **more)
    free = gen(llm, PROMPTS[:1], loop())[0].outputs[0]
    detection = {"max_pattern_size": 4, "min_pattern_size": 2, "min_count": 3}
    end = _first_repetition(free.token_ids, range(2, 5), 3)
    assert end is not None and end < 40
    out = gen(llm, PROMPTS[:1], loop(repetition_detection=detection))[0].outputs[0]
    assert out.token_ids == free.token_ids[:end]
    assert (out.finish_reason, out.stop_reason) == ("repetition", "repetition_detected")
    off = gen(llm, PROMPTS[:1], loop(repetition_detection={"max_pattern_size": 0}))[0].outputs[0]
    assert off.token_ids == free.token_ids and off.finish_reason == "length"
    for bad in ({"max_pattern_size": 2, "min_count": 1}, {"max_pattern_size": 2, "min_pattern_size": 3}):
        with pytest.raises(ValueError, match="min_count must be >= 2|min_pattern_size <= max_pattern_size"):
            SamplingParams(repetition_detection=bad)


def test_repetition_penalty_matches_transformers(llm, hf):
    prompt = PROMPTS[1]
    ours = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.8,
                                            ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, repetition_penalty=1.8,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == ref


def test_presence_and_frequency_penalties_follow_their_definition(llm, hf):
    prompt, presence, frequency = PROMPTS[0], 1.5, 0.7
    ours = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=12, presence_penalty=presence,
                                            frequency_penalty=frequency, ignore_eos=True))[0].outputs[0].token_ids
    seq, outputs = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf(torch.tensor([seq])).logits[0, -1]
            counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            token = int(logits.argmax())
            outputs.append(token)
            seq.append(token)
    assert ours == outputs
    assert ours != greedy_ids(llm, prompt, 12)  # the penalties changed something


def _reference_greedy(hf, prompt: list[int], steps: int, mask) -> list[int]:
    """Greedy decoding with transformers, `mask(outputs)` giving the token ids to forbid at each step."""
    seq, outputs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([seq])).logits[0, -1]
            logits[mask(outputs)] = float("-inf")
            outputs.append(int(logits.argmax()))
            seq.append(outputs[-1])
    return outputs


def test_allowed_token_ids_restrict_every_step(llm, hf):
    prompt = PROMPTS[1]
    free = greedy_ids(llm, prompt, 10)
    allowed = sorted(set(range(300, 340)) | {free[1]})  # the free choice at one step, never at the first
    ours = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=10, allowed_token_ids=allowed,
                                            ignore_eos=True, logprobs=2))[0].outputs[0]
    others = torch.ones(hf.config.vocab_size, dtype=torch.bool)
    others[allowed] = False
    assert ours.token_ids == _reference_greedy(hf, prompt, 10, lambda outputs: others)
    assert set(ours.token_ids) <= set(allowed) and ours.token_ids != free
    # logprobs stay those of the model, as in vLLM: the restriction acts on sampling only
    assert max(ours.logprobs[0], key=lambda t: ours.logprobs[0][t].logprob) == free[0]


def test_bad_words_are_never_generated(llm, hf):
    """vLLM's rule: a bad word's last token is banned where the generated tokens end with the rest of it."""
    prompt = PROMPTS[0]
    tokenizer = llm.get_tokenizer()
    free = greedy_ids(llm, prompt, 12)
    words = [tokenizer.decode(free[2:4]), tokenizer.decode(free[6:7])]
    params = SamplingParams(temperature=0, max_tokens=12, bad_words=words, ignore_eos=True)
    ours = gen(llm, [prompt], params)[0].outputs[0].token_ids
    sequences = llm.llm_engine.processor.validate_params(params).bad_words_token_ids
    assert sequences and all(len(ids) >= 1 for ids in sequences)

    def banned(outputs):
        return [ids[-1] for ids in sequences
                if len(ids) - 1 <= len(outputs) and outputs[len(outputs) - len(ids) + 1:] == ids[:-1]]
    assert ours == _reference_greedy(hf, prompt, 12, banned)
    assert ours != free
    for ids in sequences:  # no bad word anywhere in the output
        assert all(ours[i:i + len(ids)] != ids for i in range(len(ours)))


def _grammar_mask(tokenizer, vocab_size: int, structured: StructuredOutputsParams):
    """The reference for structured outputs: xgrammar's own matcher, replayed over the outputs so far, gives the
    tokens to forbid (what the engine must apply at each step, for each request, wherever it is in a batch)."""
    import xgrammar as xgr
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    if structured.json is not None:
        grammar = compiler.compile_json_schema(json.dumps(structured.json), any_whitespace=False,
                                               separators=(",", ":"))
    elif structured.regex is not None:
        grammar = compiler.compile_regex(structured.regex)
    else:
        grammar = compiler.compile_grammar(structured.grammar or
                                           "root ::= " + " | ".join(json.dumps(c) for c in structured.choice))

    def banned(outputs):
        matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=[tokenizer.eos_token_id])
        assert all(matcher.accept_token(t) for t in outputs)
        bits = xgr.allocate_token_bitmask(1, vocab_size)
        matcher.fill_next_token_bitmask(bits)
        allowed = ((bits[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()
        return ~allowed[:vocab_size]
    return banned


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
STRUCTURED = [StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
              StructuredOutputsParams(regex=r"[a-c]{2,4}-[0-9]{2}"),
              StructuredOutputsParams(grammar='root ::= "(" digit digit? digit? ")"\ndigit ::= [0-9]'),
              StructuredOutputsParams(choice=["yes", "no", "maybe later", "maybe not"])]


def _satisfies(text: str, structured: StructuredOutputsParams) -> bool:
    if structured.json is not None:
        value = json.loads(text)
        return set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool) and \
            isinstance(value["n"], int) and 0 <= value["n"] <= 99 and value["tag"] in ("red", "green")
    if structured.regex is not None:
        return re.fullmatch(structured.regex, text) is not None
    if structured.grammar is not None:
        return re.fullmatch(r"\([0-9]{1,3}\)", text) is not None
    return text in structured.choice


def test_structured_outputs_follow_the_model_inside_the_grammar(llm, hf):
    """vLLM's structured outputs (json schema, regex, EBNF grammar, choice; xgrammar as vLLM's default backend):
    greedy takes at each step the model's best token of those the grammar allows (transformers with the
    grammar's own mask), the output satisfies the constraint and ends with EOS where the grammar ends. All kinds
    run in one batch, beside an unconstrained request that stays as it is alone."""
    tokenizer = llm.get_tokenizer()
    prompts = [PROMPTS[0], [1, 5, 6, 7], PROMPTS[1], [1, 300, 301]]
    batch = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=s) for s in STRUCTURED]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = gen(llm, prompts + [PROMPTS[0]], batch + [free])
    assert outs[-1].outputs[0].token_ids == greedy_ids(llm, PROMPTS[0], 12)
    for prompt, structured, out in zip(prompts, STRUCTURED, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and _satisfies(c.text, structured), (structured, c.text)
        banned = _grammar_mask(tokenizer, hf.config.vocab_size, structured)
        assert c.token_ids == _reference_greedy(hf, prompt, len(c.token_ids), banned)
        assert c.token_ids[-1] == tokenizer.eos_token_id
    # sampled completions (each its own walk through the grammar) satisfy it too
    for structured in STRUCTURED:
        sampled = gen(llm, PROMPTS[:1], SamplingParams(n=6, temperature=1.0, seed=0, max_tokens=40,
                                                       structured_outputs=structured))[0].outputs
        assert all(c.finish_reason == "stop" and _satisfies(c.text, structured) for c in sampled)
        if structured.choice:
            assert len({c.text for c in sampled}) > 1


def test_a_constraint_too_slow_to_compile_is_refused():
    """Online a constraint compiles off the event loop, and one that takes too long is refused (vLLM's guard
    against crafted regexes). The cost grows with the vocabulary: SmolLM2's tokenizer (49,152 tokens)."""
    from shardserve.engine.structured_output import StructuredOutputCompiler
    from shardserve.models.gguf import default_generation_model, load_gguf_tokenizer
    tokenizer = load_gguf_tokenizer(default_generation_model())
    compiler = StructuredOutputCompiler(tokenizer, len(tokenizer))
    asyncio.run(compiler.compile_ahead(StructuredOutputsParams(regex="[a-z]+"), timeout_s=60))  # builds the compiler
    slow = StructuredOutputsParams(regex=r"[a-z]{1,800}@[a-z]{1,800}\.com")
    with pytest.raises(ValueError, match="regex took longer than 0.05 s"):
        asyncio.run(compiler.compile_ahead(slow, timeout_s=0.05))


def test_the_engine_wide_structured_outputs_config(path):
    """vLLM's structured_outputs_config: disable_any_whitespace for every request's JSON (the same tokens as the
    request's own flag), xgrammar the one backend."""
    compact = LLM(path, dtype="float32", structured_outputs_config={"backend": "xgrammar",
                                                                    "disable_any_whitespace": True})
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SCHEMA})
    got = gen(compact, PROMPTS, [params] * 2)
    asked = gen(compact, PROMPTS, [params.clone(structured_outputs=StructuredOutputsParams(
        json=SCHEMA, disable_any_whitespace=True))] * 2)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in asked]
    assert all(json.loads(o.outputs[0].text) and not re.search(r"\s", o.outputs[0].text) for o in got)
    compact.shutdown()
    for bad, message in [({"backend": "guidance"}, "is not available"), ({"whitespace": 1}, "takes backend")]:
        with pytest.raises(ValueError, match=message):
            LLM(path, structured_outputs_config=bad)


def test_structured_outputs_json_object_and_the_dict_form(llm):
    """json_object: any JSON object; the params also come as a dict, as vLLM takes them."""
    out = gen(llm, PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=64,
                                           structured_outputs={"json_object": True}))
    for o in out:
        text = o.outputs[0].text
        assert text.lstrip().startswith("{")
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_structural_tags_in_both_of_vllms_forms(llm):
    """structural_tag: xgrammar's format (here one tag the output must be: "<f>", JSON of a schema, "</f>"), and
    vLLM's older {"structures", "triggers"} (free text until a trigger; the random model never writes one)."""
    ok = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>",
                                                "content": {"type": "json_schema", "json_schema": ok}}}
    structures = {"structures": [{"begin": "<f>", "schema": ok, "end": "</f>"}], "triggers": ["<f>"]}
    tagged, free = (gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, structured_outputs={
        "structural_tag": json.dumps(t)}))[0].outputs[0] for t in (tag, structures))
    assert tagged.text.startswith("<f>{")
    assert free.token_ids == greedy_ids(llm, PROMPTS[0], 24)


def test_structured_outputs_bad_input_is_refused_before_anything_runs(llm):
    for bad, message in [({"choice": []}, "non-empty list"), ({"choice": ["a"], "regex": "a"}, "one kind"),
                         ({}, "got none"), ({"regex": ""}, "non-empty string"), ({"json": 3}, "JSON schema"),
                         ({"json_object": False, "grammar": None}, "got none"),
                         ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(structured_outputs=bad)
    for bad, message in [({"regex": "a(b"}, r"Invalid structured_outputs.regex: .*parenthesis"),
                         ({"json": "{not json"}, "Invalid structured_outputs.json"),
                         ({"grammar": "root ::= undefined_rule"}, "Invalid structured_outputs.grammar: .*not defined"),
                         ({"structural_tag": "{}"}, "Invalid structured_outputs.structural_tag")]:
        with pytest.raises(ValueError, match=message):
            gen(llm, PROMPTS[:1], SamplingParams(structured_outputs=bad))
    with pytest.raises(ValueError, match="cannot be combined with ignore_eos"):
        gen(llm, PROMPTS[:1], SamplingParams(structured_outputs={"choice": ["a"]}, ignore_eos=True))
    assert not llm.llm_engine.has_unfinished_requests()
    # and the engine serves on
    assert gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, structured_outputs={"choice": ["yes"]})
               )[0].outputs[0].text == "yes"


def test_logit_bias_forces_a_token(llm):
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=5, logit_bias={77: 100.0},
                                              ignore_eos=True))[0].outputs[0]
    assert out.token_ids == [77] * 5


def test_max_tokens_none_runs_to_max_model_len(path):
    llm = LLM(path, dtype="float32", max_model_len=32)
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 32 - len(PROMPTS[0])
    assert out.finish_reason == "length"


def test_logprob_ranks_count_ties_as_vllm_does():
    """vLLM's rank: how many tokens are at least as likely, the token itself included."""
    from shardserve.layers.sampler import compute_logprobs
    row = torch.tensor([[-0.5, -1.5, -1.5, -2.0, -1.5]])
    for token, rank in [(0, 1), (1, 4), (2, 4), (3, 5)]:
        _, _, ranks = compute_logprobs(row, torch.tensor([token]), 0)
        assert ranks.item() == rank
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        SamplingParams(n=2, temperature=0)


@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_top_k_top_p_from_candidates_equal_the_sorted_way(shape, monkeypatch):
    """The CPU's top-k / top-p keeps exactly what sorting each row keeps: rows with top-k under and over the
    first candidates, top-p alone, both, and rows that filter nothing, in one batch. A peaked batch is decided
    from the candidates; a flat one (top-p needing much of the vocabulary) is sorted."""
    from shardserve.layers import sampler
    vocab = 40_000
    g = torch.Generator().manual_seed(0)
    rows = [(5, 1.0), (300, 1.0), (vocab, 0.9), (vocab, 0.5), (40, 0.8), (1000, 0.9), (vocab, 1.0), (1, 0.3)]
    logits = torch.randn(len(rows), vocab, generator=g) * (4.0 if shape == "peaked" else 0.05)
    sorted_way, sorts = sampler._filter_sorted, []
    monkeypatch.setattr(sampler, "_filter_sorted", lambda *a: sorts.append(1) or sorted_way(*a))
    for top_k, top_p in ((True, True), (True, False), (False, True)):
        b = sampler.SamplingBatch(temperature=torch.ones(len(rows)), all_greedy=False,
                                  top_k=torch.tensor([k for k, _ in rows]) if top_k else None,
                                  top_p=torch.tensor([p for _, p in rows]) if top_p else None)
        got, expected = sampler._filter_candidates(logits, b), sorted_way(logits, b)
        assert torch.equal(got.isinf(), expected.isinf()), (top_k, top_p)
        assert torch.equal(got[~got.isinf()], expected[~expected.isinf()])
    assert len(sorts) == (0 if shape == "peaked" else 2)  # flat: the two batches with top-p alone or with top-k


def test_sampled_tokens_follow_the_distribution():
    """The sampler's draws (inverse CDF, one uniform a row) land on each token as often as its probability says
    (40,000 draws: within 0.01 of it), never on a token top_k filtered out, and a seeded row draws the same
    token whatever the batch around it."""
    from shardserve.layers.sampler import Sampler, SamplingBatch
    rows, vocab = 40_000, 12
    logits = torch.linspace(-2.0, 1.5, vocab).expand(rows, vocab).contiguous()
    batch = SamplingBatch(temperature=torch.full((rows,), 0.8), all_greedy=False)
    tokens = Sampler(seed=3)(logits, batch).token_ids
    frequencies = torch.bincount(tokens, minlength=vocab).float() / rows
    assert (frequencies - (logits[0] / 0.8).softmax(-1)).abs().max() < 0.01
    batch.top_k = torch.full((rows,), 4)
    tokens = Sampler(seed=3)(logits, batch).token_ids
    assert set(tokens.tolist()) == set(range(vocab - 4, vocab))

    def seeded_token(batch_rows: int) -> int:
        b = SamplingBatch(temperature=torch.ones(batch_rows), all_greedy=False,
                          generators={batch_rows - 1: torch.Generator().manual_seed(11)})
        return Sampler(seed=batch_rows)(logits[:batch_rows], b).token_ids[-1].item()
    assert seeded_token(1) == seeded_token(7) == seeded_token(300)


@pytest.mark.parametrize("num_thresholds", [1, 3, 8, 9, 40])
def test_count_at_least_counts_as_a_comparison_does(num_thresholds):
    """Both of count_at_least's ways (a pass per threshold, buckets past 8): ties counted, -inf (padding)
    thresholds reached by every value."""
    from shardserve.layers.sampler import count_at_least
    g = torch.Generator().manual_seed(num_thresholds)
    x = torch.randint(-50, 0, (5, 700), generator=g).float()  # many ties
    thresholds = x.gather(1, torch.randint(0, 700, (5, num_thresholds), generator=g))
    thresholds[0, -1] = float("-inf")
    expected = (x.unsqueeze(1) >= thresholds.unsqueeze(2)).sum(-1)
    assert torch.equal(count_at_least(x, thresholds).long(), expected)


@pytest.mark.parametrize("vocab", [32000, 50257, 1000, 300])
def test_chunked_argmax_and_topk_equal_torch(vocab):
    from shardserve.layers.sampler import first_argmax, top_k
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(33, vocab, generator=g)
    x[0, -1] = 50.0                      # the maximum in the ragged tail
    x[1, 5] = x[1, vocab // 2] = 60.0    # a tie: the first maximum wins, as argmax
    x[2, :] = 1.0                        # all equal
    x[3, min(vocab - 1, 7 * 128 + 3)] = 70.0
    assert torch.equal(first_argmax(x), x.argmax(-1))
    assert torch.equal(first_argmax(x.bfloat16()), x.bfloat16().argmax(-1))
    for k in (1, 8, 20):
        values, ids = top_k(x, k)
        ref_values, _ = x.topk(k, dim=-1)
        assert torch.equal(values, ref_values)
        assert torch.equal(x.gather(1, ids), values)  # the indices point at those values
        assert all(len(set(row.tolist())) == k for row in ids)


@pytest.mark.skipif(not triton_backend.available(),
                    reason="needs triton (the test extra installs it on Linux x86-64; a CPU runs its interpreter)")
@pytest.mark.parametrize("vocab", [151936, 2048, 300])
def test_triton_argmax_equals_torch(vocab):
    """The GPU's greedy argmax (two Triton kernels; in the interpreter on a CPU): ties go to the first maximum,
    across chunks and inside one, as torch's argmax."""
    from shardserve.layers.sampler import triton_argmax
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[0, -1] = 50.0                                   # in the last, ragged chunk
    x[1, 5] = x[1, vocab - 3] = 60.0                  # a tie across chunks
    x[2, :] = 1.0                                     # all equal
    x[3, vocab // 2] = x[3, vocab // 2 + 1] = 70.0    # a tie inside one chunk
    x[4, :] = float("-inf")
    x[4, vocab // 3] = 0.0                            # everything else masked
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(device, dtype)
        assert torch.equal(triton_argmax(y).cpu(), y.argmax(-1).cpu())
    wide = torch.randn(3, vocab + 7, generator=g).to(device)[:, :vocab]   # rows with a stride over V
    assert torch.equal(triton_argmax(wide).cpu(), wide.argmax(-1).cpu())
    assert triton_argmax(x[:0].to(device)).shape == (0,)
