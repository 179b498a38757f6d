"""The online server on Ray Serve, through the official `openai` client and plain HTTP on 127.0.0.1.

The app (conftest's `server`): a random Llama served as "tiny" (with a chat template, prompt embeddings on,
an API key), the same weights as "tiny-tp2" on two tensor-parallel worker actors, and pooling models. Every
greedy answer must equal the offline `LLM` on the same input.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
from typing import Literal

import httpx
import pydantic
import pytest
import torch
from conftest import API_KEY, ENGINE, TEMPLATE
from openai import BadRequestError, OpenAI

from shardserve import LLM, BeamSearchParams, SamplingParams, TokensPrompt
from shardserve.entrypoints.prompt_embeds import encode_prompt_embeds
from shardserve.models.source import default_embedding_model

pytestmark = pytest.mark.timeout(300)

CUSTOM = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}"
          "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "The capital of France is"}]
PROMPTS = ["The quick brown fox", "Hello, world! Streaming text"]


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model_dir, chat_template=TEMPLATE, enable_prompt_embeds=True, dtype="float32", **ENGINE)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def _headers() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


# the front ------------------------------------------------------------------------------------------------

def _haproxy_configs() -> list[str]:
    """The config files of the HAProxy processes running on this machine."""
    import os
    configs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) == "haproxy" and "-f" in args:
            configs.append(args[args.index("-f") + 1])
    return configs


def test_haproxy_fronts_the_app_where_it_is_installed(server):
    """As `shardserve serve` starts a cluster: HAProxy listens on the app's port and passes requests to the
    replicas' own HTTP servers, with no Python proxy in between."""
    import os

    from shardserve.cluster.ray_cluster import haproxy_available
    if not haproxy_available():
        pytest.skip("no HAProxy binary here (ray[serve] installs one on Linux): Serve's proxy fronts the app")
    port = server.rsplit(":", 1)[1]
    configs = [open(path).read().splitlines() for path in _haproxy_configs()]
    ours = [lines for lines in configs if any(line.split()[:2] == ["bind", f"127.0.0.1:{port}"] for line in lines)]
    assert len(ours) == 1, configs
    # One HAProxy thread per 4 cores (1 to 4): its threads wake once a step on the cores the model runs on.
    threads = max(1, min(4, len(os.sched_getaffinity(0)) // 4))
    assert [line.split() for line in ours[0] if line.strip().startswith("nbthread")] == [["nbthread", str(threads)]]
    assert httpx.get(f"{server}/version").json()["version"]


# completions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny", "tiny-tp2"])
def test_completions_equal_offline(client, offline, model):
    expected = offline.generate(PROMPTS, greedy(max_tokens=10), use_tqdm=False)
    got = client.completions.create(model=model, prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
    assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert got.usage.completion_tokens == 20


def test_completion_token_prompt_n_logprobs_echo(server, client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    expected = offline.generate({"prompt_token_ids": ids}, greedy(max_tokens=6, logprobs=3), use_tqdm=False)[0]
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=1.0, logprobs=3, n=2,
                                    extra_body={"top_k": 1})
    assert len(got.choices) == 2
    for choice in got.choices:  # top_k=1 is greedy (temperature 0 takes only n=1, as in vLLM): the same twice
        assert choice.text == expected.outputs[0].text
        ref = expected.outputs[0].logprobs
        assert choice.logprobs.token_logprobs == pytest.approx(
            [ref[i][t].logprob for i, t in enumerate(expected.outputs[0].token_ids)], abs=1e-4)
        # The top 3 by token text, as vLLM writes them (the token itself first, so the k + 1 of OpenAI's API
        # where it is not among them; ids that read alike share a key, the later one's value): greedy's token
        # is the best.
        for top, chosen, token in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs,
                                      choice.logprobs.tokens):
            assert 1 <= len(top) <= 3 and token in top and max(top.values()) <= chosen + 1e-4
    r = httpx.post(f"{server}/v1/completions", headers=_headers(),  # vLLM: a null max_tokens is the default, 16
                   json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": None, "temperature": 0,
                         "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16
    echoed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPTS[0])
    # vLLM's prompt_logprobs field: each prompt position's entries by token id, as offline
    ref = offline.generate({"prompt_token_ids": ids}, greedy(max_tokens=2, prompt_logprobs=1),
                           use_tqdm=False)[0].prompt_logprobs
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 1}).choices[0].prompt_logprobs
    assert got[0] is None and len(got) == len(ids) == len(ref)
    for entry, expected_entry in zip(got[1:], ref[1:]):
        assert {int(t) for t in entry} == set(expected_entry)
        for t, value in entry.items():
            assert value["logprob"] == pytest.approx(expected_entry[int(t)].logprob, abs=1e-4)
            assert (value["rank"], value["decoded_token"]) == (expected_entry[int(t)].rank,
                                                               expected_entry[int(t)].decoded_token)


def test_completion_stream_equals_plain(client):
    plain = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_continuous_usage_stats_count_each_choice_so_far(client):
    """`stream_options.continuous_usage_stats` (vLLM): every chunk carries the usage of its choice so far. A
    chunk carries one token, or several where the stream fell behind the engine (the logprobs count them)."""
    plain = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=2,
                                            logprobs=1, stream=True, stream_options=options, extra_body={"top_k": 1}))
    for index in (0, 1):
        choice = [c for c in chunks if c.choices and c.choices[0].index == index]
        sent = list(itertools.accumulate(len(c.choices[0].logprobs.tokens) for c in choice))
        assert [c.usage.completion_tokens for c in choice] == sent and sent[-1] == 6
        assert {(c.usage.prompt_tokens, c.usage.total_tokens - c.usage.completion_tokens) for c in choice} == \
            {(plain.usage.prompt_tokens, plain.usage.prompt_tokens)}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12

    chat_plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    chat = [c for c in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                      logprobs=True, stream=True, stream_options=options)]
    content = [c for c in chat if c.choices]
    sent = list(itertools.accumulate(len(c.choices[0].logprobs.content) if c.choices[0].logprobs else 0
                                     for c in content))
    assert sent[0] == 0 and content[0].choices[0].delta.role == "assistant"  # the role chunk first
    assert [c.usage.completion_tokens for c in content] == sent and sent[-1] == 5
    assert {c.usage.prompt_tokens for c in chat} == {chat_plain.usage.prompt_tokens}
    assert chat[-1].usage.completion_tokens == 5 and not chat[-1].choices


def test_stream_interval_sends_fewer_larger_chunks(client):
    """The request's `stream_interval` (vLLM's extra field): the first token at once, then 4 at a time, the
    rest with the finish; the text and the token count are the plain request's."""
    plain = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = [c for c in client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                                   logprobs=1, stream=True, extra_body={"stream_interval": 4})
              if c.choices]
    # The engine reports after tokens 1, 5, 9 and 10; a stream that fell behind joins reports, never splits one.
    assert set(itertools.accumulate(len(c.choices[0].logprobs.tokens) for c in chunks)) <= {1, 5, 9, 10}
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    chat_plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0)
    chat = [c for c in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0,
                                                      logprobs=True, stream=True, extra_body={"stream_interval": 4})
            if c.choices and c.choices[0].logprobs]
    assert set(itertools.accumulate(len(c.choices[0].logprobs.content) for c in chat)) <= {1, 5, 9}
    assert "".join(c.choices[0].delta.content or "" for c in chat) == chat_plain.choices[0].message.content


def test_allowed_token_ids_and_bad_words_equal_offline(client, offline):
    free = offline.generate(PROMPTS[0], greedy(max_tokens=8), use_tqdm=False)[0].outputs[0]
    constraints = {"allowed_token_ids": list(range(300, 340)),
                   "bad_words": [offline.get_tokenizer().decode(free.token_ids[1:2])]}
    for name, value in constraints.items():
        expected = offline.generate(PROMPTS[0], greedy(max_tokens=8, **{name: value}), use_tqdm=False)[0]
        got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                        extra_body={name: value})
        assert got.choices[0].text == expected.outputs[0].text != free.text, name


def test_logprob_token_ids_repetition_detection_and_xargs_equal_offline(client, offline):
    """vLLM's request fields: logprob_token_ids (completions and chat list those tokens' logprobs, as offline),
    repetition_detection (ends a loop with finish_reason "repetition"), vllm_xargs (taken)."""
    wanted = [5, 17, 300]
    expected = offline.generate(PROMPTS[0], greedy(max_tokens=4, logprob_token_ids=wanted), use_tqdm=False)[0]
    as_ids = {"return_tokens_as_token_ids": True}  # tokens named "token_id:<id>"
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=0,
                                    extra_body={"logprob_token_ids": wanted, "vllm_xargs": {"trace": "x"}, **as_ids})
    for top, entry in zip(got.choices[0].logprobs.top_logprobs, expected.outputs[0].logprobs):
        assert top == pytest.approx({f"token_id:{t}": lp.logprob for t, lp in entry.items()}, abs=1e-4)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                          logprobs=True, extra_body={"logprob_token_ids": wanted, **as_ids})
    offline_chat = offline.chat(MESSAGES, greedy(max_tokens=2, logprob_token_ids=wanted), use_tqdm=False)[0]
    for item, entry in zip(chat.choices[0].logprobs.content, offline_chat.outputs[0].logprobs):
        assert {t.token: t.logprob for t in item.top_logprobs} == pytest.approx(
            {f"token_id:{t}": lp.logprob for t, lp in entry.items()}, abs=1e-4)
    with pytest.raises(BadRequestError, match="`logprobs` must be set"):
        client.completions.create(model="tiny", prompt="x", extra_body={"logprob_token_ids": wanted})

    detection = {"max_pattern_size": 4, "min_pattern_size": 2, "min_count": 3}
    loop = greedy(max_tokens=40, ignore_eos=True, allowed_token_ids=[40, 41], repetition_detection=detection)
    expected = offline.generate(PROMPTS[0], loop, use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, extra_body={
        "ignore_eos": True, "allowed_token_ids": [40, 41], "repetition_detection": detection})
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected.text, "repetition")


def test_completion_prompt_embeds(client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    embeds = offline.llm_engine.executor.worker.model.get_input_embeddings(torch.tensor(ids)).detach()
    expected = offline.generate({"prompt_embeds": embeds}, greedy(max_tokens=8), use_tqdm=False)[0]
    got = client.completions.create(model="tiny", prompt="", max_tokens=8, temperature=0,
                                    extra_body={"prompt_embeds": encode_prompt_embeds(embeds)})
    assert got.choices[0].text == expected.outputs[0].text


def test_completion_beam_search(client, offline):
    expected = offline.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=2, max_tokens=5))[0]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, n=2,
                                    extra_body={"use_beam_search": True})
    tokenizer = offline.get_tokenizer()
    prompt_len = len(tokenizer.encode(PROMPTS[0]))
    assert [c.text for c in got.choices] == [tokenizer.decode(s.tokens[prompt_len:], skip_special_tokens=True)
                                             for s in expected.sequences]


def test_chat_beam_search(client, offline):
    """use_beam_search on the Chat API: the n best beams of the chat prompt, each a message; it does not stream."""
    prompt = list(offline.chat(MESSAGES, greedy(max_tokens=1), use_tqdm=False)[0].prompt_token_ids)
    expected = offline.beam_search([TokensPrompt(prompt_token_ids=prompt)],
                                   BeamSearchParams(beam_width=4, max_tokens=8))[0]
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, n=4,
                                         extra_body={"use_beam_search": True})
    assert [c.message.content for c in got.choices] == [
        offline.get_tokenizer().decode(s.tokens[len(prompt):], skip_special_tokens=True) for s in expected.sequences]
    # as vLLM's server: a beam that ended in EOS answers without it, the EOS its stop_reason
    eos = offline.get_tokenizer().eos_token_id
    assert any(s.tokens[-1] == eos for s in expected.sequences)  # (one beam here ends so)
    assert got.usage.completion_tokens == sum(len(s.tokens) - len(prompt) - (s.tokens[-1] == eos)
                                              for s in expected.sequences)
    assert [c.stop_reason for c in got.choices] == [eos if s.tokens[-1] == eos else None for s in expected.sequences]
    with pytest.raises(BadRequestError, match="does not stream"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, stream=True,
                                       extra_body={"use_beam_search": True})


def test_vllm_prompt_and_response_extras_equal_offline(client, offline):
    """vLLM's extra fields: truncate_prompt_tokens / truncation_side / add_special_tokens shape the prompt as
    tokenization_kwargs do offline; return_token_ids puts the prompt's and the completion's ids in the response
    (streamed: the prompt's with the first chunk, then each chunk's new ids); return_tokens_as_token_ids names
    logprob tokens by id; request_id names the response."""
    shaping = {"truncate_prompt_tokens": 4, "truncation_side": "left", "add_special_tokens": False}
    expected = offline.generate(PROMPTS[1], greedy(max_tokens=6), use_tqdm=False, tokenization_kwargs=shaping)[0]
    assert len(expected.prompt_token_ids) == 4
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=1,
                                    extra_body={**shaping, "return_token_ids": True, "request_id": "abc",
                                                "return_tokens_as_token_ids": True})
    choice = got.choices[0]
    assert got.id == "cmpl-abc" and got.usage.prompt_tokens == 4
    assert (choice.prompt_token_ids, choice.token_ids) == (expected.prompt_token_ids, expected.outputs[0].token_ids)
    assert choice.text == expected.outputs[0].text
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in expected.outputs[0].token_ids]
    chunks = [c.choices[0] for c in client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True,
        extra_body={**shaping, "return_token_ids": True}) if c.choices]
    assert chunks[0].prompt_token_ids == expected.prompt_token_ids
    assert all(getattr(c, "prompt_token_ids", None) is None for c in chunks[1:])
    assert sum((c.token_ids for c in chunks), []) == expected.outputs[0].token_ids

    shaping = {"truncate_prompt_tokens": 9, "truncation_side": "left"}
    expected = offline.chat(MESSAGES, greedy(max_tokens=5), use_tqdm=False, tokenization_kwargs=shaping)[0]
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                         extra_body={**shaping, "return_token_ids": True, "request_id": "xyz"})
    assert got.id == "chatcmpl-xyz" and got.prompt_token_ids == expected.prompt_token_ids
    assert got.choices[0].token_ids == expected.outputs[0].token_ids
    assert got.choices[0].message.content == expected.outputs[0].text
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={**shaping, "return_token_ids": True}))
    assert chunks[0].prompt_token_ids == expected.prompt_token_ids
    assert sum((c.choices[0].token_ids for c in chunks[1:]), []) == expected.outputs[0].token_ids


def test_cache_salt_and_cached_token_counts(client):
    """--enable-prompt-tokens-details (on for "tiny"): usage says how many prompt tokens the prefix cache
    served; a request's cache_salt lets it find only blocks cached under the same salt."""
    prompt = "cache salt " * 12  # more than two full blocks of 16 tokens

    def cached(model="tiny", **extra):
        got = client.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body=extra)
        details = got.usage.prompt_tokens_details
        return details.cached_tokens if details is not None else None
    assert cached(cache_salt="a-secret") == 0
    assert cached(cache_salt="a-secret") >= 32
    assert cached(cache_salt="another") == 0 and cached() == 0
    assert cached() >= 32
    assert cached(model="tiny-tp2") is None   # not asked for there
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 32


# chat -------------------------------------------------------------------------------------------------

def test_chat_equals_offline(client, offline):
    expected = offline.chat(MESSAGES, greedy(max_tokens=8), use_tqdm=False)[0]
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.outputs[0].text
    assert len(got.choices[0].logprobs.content) == 8
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)

    custom = offline.chat(MESSAGES, greedy(max_tokens=8), use_tqdm=False, chat_template=CUSTOM)[0]
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                         extra_body={"chat_template": CUSTOM})
    assert got.choices[0].message.content == custom.outputs[0].text


def test_chat_stream(client):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


# plain HTTP: tokens, health, errors --------------------------------------------------------------------

def test_tokenize_detokenize_models_health_version(server, offline):
    tokenizer = offline.get_tokenizer()
    r = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": PROMPTS[0]})
    assert r.status_code == 200 and r.json()["tokens"] == tokenizer.encode(PROMPTS[0])
    assert r.json()["max_model_len"] == 256
    r = httpx.post(f"{server}/detokenize", json={"model": "tiny", "tokens": tokenizer.encode(PROMPTS[0])})
    assert r.json()["prompt"] == tokenizer.decode(tokenizer.encode(PROMPTS[0]))
    models = httpx.get(f"{server}/v1/models", headers=_headers()).json()
    assert {m["id"] for m in models["data"]} == {"tiny", "tiny-tp2", "minilm", "minilm-st", "cross",
                                                 "classifier", "tiny-lora"}
    assert httpx.get(f"{server}/health").status_code == 200
    assert "version" in httpx.get(f"{server}/version").json()


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "word " * 400}, 400, "maximum context length is 256 tokens"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_interval": 0}, 400, "stream_interval"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream=True"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, 400,
     "needs json_schema.schema"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format type must be"),
    ({"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a(b"}}, 400,
     "Invalid structured_outputs.regex"),
    ({"model": "tiny", "prompt": "x", "structured_outputs": {"regexp": "a"}}, 400,
     "Unknown structured_outputs field(s): regexp"),
    ({"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}, 400, "one kind"),
    ({"model": "tiny", "prompt": "x", "use_beam_search": True, "n": 2, "guided_regex": "a+"}, 400,
     "cannot follow structured outputs"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": [5, 10**6]}, 400, "out of vocabulary"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ({"model": "tiny", "prompt": "x", "n": 1, "best_of": 3}, 400, "best_of is not"),
    ({"model": "tiny", "prompt": "x", "n": 2, "temperature": 0}, 400, "n must be 1 when using greedy sampling"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 257}, 400, "max_tokens=257 cannot be greater than max_model_len"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "greater than max allowed: 20"),
    ({"model": "tiny", "prompt": "x", "priority": 3}, 400, "priority scheduling is not enabled"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 300}, 400,
     "cannot be greater than max_model_len = 256"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ({"model": "tiny", "prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
    ({"model": "tiny", "prompt": "x", "guided_choice": ["a"], "ignore_eos": True}, 400, "ignore_eos"),
    ({"model": "tiny", "prompt": "x", "use_beam_search": True, "n": 2, "priority": 1}, 400, "--scheduling-policy"),
    ({"model": "tiny", "prompt": "", "prompt_embeds": base64.b64encode(b"garbage").decode()}, 400, "prompt"),
])
def test_errors_in_openai_shape(server, body, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/completions", headers=_headers(), **kwargs)
    assert r.status_code == status
    error = r.json()
    assert error["error"]["code"] == status and message in error["error"]["message"]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("logprobs", 21), ("max_tokens", 257),
                                         ("min_tokens", -1)])
def test_errors_name_the_parameter_as_vllm(server, field, value):
    """A bad parameter's error names it (`param`) and ends in vLLM's "(parameter=..., value=...)"."""
    r = httpx.post(f"{server}/v1/completions", headers=_headers(),
                   json={"model": "tiny", "prompt": "x", "temperature": 1.0, field: value})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field
    assert error["message"].endswith(f" (parameter={field}, value={value})"), error


class Verdict(pydantic.BaseModel):
    ok: bool
    colour: Literal["red", "green"]


def test_structured_outputs_equal_offline(client, offline):
    """vLLM's structured outputs online: `structured_outputs` (and the older guided_* fields), OpenAI's
    `response_format` (json_schema, json_object), plain and streamed; each answer is the offline engine's under
    the same constraint, and the openai client's `parse` reads the JSON back into its pydantic model."""
    choices = ["Paris", "London", "Rome or Madrid"]
    schema = Verdict.model_json_schema()
    cases = [({"structured_outputs": {"choice": choices}}, {"choice": choices}),
             ({"guided_choice": choices}, {"choice": choices}),
             ({"structured_outputs": {"regex": "[a-c]{2,5}!"}}, {"regex": "[a-c]{2,5}!"}),
             ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, {"grammar": 'root ::= "x" [0-9] [0-9]?'}),
             # a random model writes whitespace where JSON allows it; vLLM's disable_any_whitespace stops that
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
               "structured_outputs": {"disable_any_whitespace": True}},
              {"json": schema, "disable_any_whitespace": True})]
    for body, structured in cases:
        expected = offline.generate(PROMPTS[0], greedy(max_tokens=48, structured_outputs=structured),
                                    use_tqdm=False)[0].outputs[0]
        got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=48, temperature=0,
                                        extra_body=body)
        assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "stop", body
        streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=48, temperature=0,
                                             stream=True, extra_body=body)
        assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert expected.text and Verdict.model_validate_json(expected.text)
    compact = {"json": schema, "disable_any_whitespace": True}
    expected = offline.chat(MESSAGES, greedy(max_tokens=48, structured_outputs=compact), use_tqdm=False)[0].outputs[0]
    parsed = client.chat.completions.parse(model="tiny", messages=MESSAGES, max_tokens=48, temperature=0,
                                           response_format=Verdict,
                                           extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    assert parsed.choices[0].message.content == expected.text
    assert parsed.choices[0].message.parsed == Verdict.model_validate_json(expected.text)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=48, temperature=0,
                                         response_format={"type": "json_object"})
    expected = offline.chat(MESSAGES, greedy(max_tokens=48, structured_outputs={"json_object": True}),
                            use_tqdm=False)[0].outputs[0]
    assert got.choices[0].message.content == expected.text


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}  # a random model would pad JSON with spaces


def _streamed_tool_calls(chunks, content: bool = False) -> tuple[dict[int, dict], str | None]:
    """A streamed answer's tool calls assembled as the openai client's users do: by index, arguments joined
    (`content`: the answer may have content beside them)."""
    calls, finish = {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert content or not choice.delta.content
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                call["arguments"] += tc.function.arguments or ""
    return calls, finish


def test_forced_tool_calls_are_structured_outputs(client, offline):
    """tool_choice naming a function, or "required", on a model without a tool-call parser ("tiny-tp2", as
    vLLM): the answer is JSON of the function's parameters, or a list of {"name", "parameters"} calls, held there
    by structured outputs (the offline engine under the same schema gives the same text) and returned as the
    message's tool_calls, plain and streamed."""
    def offline_text(schema):
        params = greedy(max_tokens=64, structured_outputs={"json": schema, "disable_any_whitespace": True})
        return offline.chat(MESSAGES, params, use_tqdm=False, tools=TOOLS)[0].outputs[0].text

    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(model="tiny-tp2", messages=MESSAGES, max_tokens=64, temperature=0, tools=TOOLS, extra_body=COMPACT)
    got = client.chat.completions.create(tool_choice=named, **kwargs).choices[0]
    (call,) = got.message.tool_calls
    assert call.function.name == "get_weather" and call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.arguments == offline_text(WEATHER)
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    assert got.message.content == "" and got.finish_reason == "stop"
    calls, finish = _streamed_tool_calls(client.chat.completions.create(tool_choice=named, stream=True, **kwargs))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    assert calls[0]["id"].startswith("chatcmpl-tool-") and finish == "stop"

    # "required", one call (parallel_tool_calls false): vLLM's schema, a list of calls of the given functions
    required = {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                        "parameters": t["function"]["parameters"]}, "required": ["name", "parameters"]}
        for t in TOOLS]}}
    got = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kwargs).choices[0]
    (expected,) = json.loads(offline_text(required))
    (call,) = got.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (expected["name"], expected["parameters"])
    assert got.finish_reason == "tool_calls"
    calls, finish = _streamed_tool_calls(client.chat.completions.create(
        tool_choice="required", parallel_tool_calls=False, stream=True, **kwargs))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(call.function.name, call.function.arguments)]
    assert finish == "tool_calls"


def test_forced_tool_calls_in_the_models_format(client, offline):
    """vLLM's strict tool calling (on by default) on a server whose tool-call parser has a structural tag ("tiny",
    hermes): a forced call is written in hermes' <tool_call> tags under a grammar of the given tools (the offline
    engine under the same tag writes the same text), and the parser reads it: a named call's content "" and
    finish "stop", "required" with parallel_tool_calls false one call and "tool_calls"; streamed alike. Strict
    tools' arguments follow their schemas. (The tags' JSON may hold any whitespace, which a random model would
    write on and on: a logit bias keeps it to what the format needs.)"""
    from shardserve.router.tool_calls import HermesToolParser
    from shardserve.router.tool_tags import ToolStrictLevel, tool_call_tag
    tools = [{"type": t["type"], "function": {**t["function"], "strict": True}} for t in TOOLS]
    named = {"type": "function", "function": {"name": "get_weather"}}
    tokenizer = offline.get_tokenizer()
    no_spaces = {i: -100.0 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}

    def offline_calls(tool_choice, parallel=None):
        tag = tool_call_tag("hermes", tools, tool_choice, parallel, ToolStrictLevel.AUTO, None)
        params = greedy(max_tokens=128, skip_special_tokens=False, structured_outputs={"structural_tag": tag},
                        logit_bias=no_spaces)
        text = offline.chat(MESSAGES, params, use_tqdm=False, tools=tools)[0].outputs[0].text
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
        return [(c["function"]["name"], c["function"]["arguments"]) for c in HermesToolParser().parse(text)[1]]

    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=128, temperature=0, tools=tools, logit_bias=no_spaces)
    for choice, parallel, finish in ((named, None, "stop"), ("required", False, "tool_calls")):
        expected = offline_calls(choice, parallel)
        (name, arguments), = expected
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[name]
        assert set(json.loads(arguments)) == set(schema["required"]) and (choice != named or name == "get_weather")
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        got = client.chat.completions.create(tool_choice=choice, **extra, **kwargs).choices[0]
        assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == expected
        assert got.message.content == "" and got.finish_reason == finish
        assert got.message.tool_calls[0].id.startswith("chatcmpl-tool-")
        calls, streamed_finish = _streamed_tool_calls(client.chat.completions.create(
            tool_choice=choice, stream=True, **extra, **kwargs))
        # (streamed, the arguments come as the model writes them; whole, as JSON re-written: vLLM's hermes)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(name, json.loads(arguments))]
        assert streamed_finish == finish


def test_auto_tool_calls_are_read_in_the_models_format(client, offline):
    """tool_choice "auto" (here by default: the request has tools) on a server with --tool-call-parser hermes: the
    answer's <tool_call> sections become tool_calls, the text before them the content, finish_reason
    "tool_calls"; streamed, the content and the calls add up to the same. An answer without a call is content.
    (A structured-output choice makes the random model write a call.)"""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    written = "Let me look." + call
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0, tools=TOOLS,
                  extra_body={"structured_outputs": {"choice": [written]}})
    got = client.chat.completions.create(**kwargs).choices[0]
    assert got.message.content == "Let me look." and got.finish_reason == "tool_calls"
    (tool_call,) = got.message.tool_calls
    assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == \
        ("get_weather", {"city": "Paris", "unit": "C"})
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls, finish = _streamed_tool_calls(chunks, content=True)
    assert content == "Let me look." and finish == "tool_calls"
    # the arguments stream as the model writes them (over several chunks), the same JSON as the whole answer's
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [("get_weather", json.loads(tool_call.function.arguments))]
    assert sum(bool(tc.function.arguments) for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or
               []) > 1
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                           tools=TOOLS).choices[0]
    expected = offline.chat(MESSAGES, greedy(max_tokens=8, skip_special_tokens=False), use_tqdm=False, tools=TOOLS)
    assert plain.message.tool_calls is None and plain.finish_reason == "length"
    assert plain.message.content == expected[0].outputs[0].text


RESPONSES_TOOLS = [{"type": "function", **t["function"], "strict": True} for t in TOOLS]   # (Responses' shape)


def test_responses_are_chat_answers(client, offline):
    """/v1/responses (OpenAI's Responses API through the openai client): `instructions` and `input` make the
    chat's messages and the answer is the chat's (the offline engine's), as output items; max_output_tokens ends
    it "incomplete"; streamed, the events add up to the same response (the client's stream helper checks their
    order); function tools and tool_choice make function_call items, which later input items give back."""
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPTS[1]}]
    expected = offline.chat(conversation, greedy(max_tokens=8), use_tqdm=False)[0]
    assert expected.outputs[0].text   # (the tiny model's answer to MESSAGES is special tokens only)
    kwargs = dict(model="tiny", instructions=conversation[0]["content"], input=conversation[1]["content"],
                  max_output_tokens=8, temperature=0)
    got = client.responses.create(**kwargs)
    assert got.id.startswith("resp_") and got.object == "response" and got.model == "tiny"
    assert got.output_text == expected.outputs[0].text and [o.type for o in got.output] == ["message"]
    assert (got.status, got.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (got.usage.input_tokens, got.usage.output_tokens) == (len(expected.prompt_token_ids), 8)
    assert (got.temperature, got.max_output_tokens, got.instructions) == (0, 8, "You are terse.")
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    kinds = [event.type for event in events]
    assert streamed.output_text == expected.outputs[0].text and streamed.status == "incomplete"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == streamed.output_text
    assert [e.sequence_number for e in events] == list(range(len(events))) and streamed.usage.output_tokens == 8
    # the input as items, the text's logprobs asked for: the same answer and logprobs as the chat's
    items = [{"type": "message", "role": m["role"], "content": [{"type": "input_text", "text": m["content"]}]}
             for m in conversation]
    got = client.responses.create(model="tiny", input=items, max_output_tokens=4, temperature=0, top_logprobs=2,
                                  include=["message.output_text.logprobs"])
    chat = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2).choices[0]
    (text,) = got.output[0].content
    assert text.text == chat.message.content
    assert [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in text.logprobs] == \
        [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in chat.logprobs.content]

    # a named function (strict tool calling: hermes' tags): a function_call item, streamed as its arguments
    tokenizer = offline.get_tokenizer()
    no_spaces = {i: -100.0 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    call_kwargs = dict(model="tiny", input=items, max_output_tokens=128, temperature=0, tools=RESPONSES_TOOLS,
                       tool_choice={"type": "function", "name": "get_weather"}, extra_body={"logit_bias": no_spaces})
    got = client.responses.create(**call_kwargs)
    chat = client.chat.completions.create(
        model="tiny", messages=conversation, max_tokens=128, temperature=0, logit_bias=no_spaces,
        tools=[{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    (call,) = got.output
    assert (call.type, call.name, call.arguments, call.status) == \
        ("function_call", "get_weather", chat.tool_calls[0].function.arguments, "completed")
    assert call.call_id.startswith("chatcmpl-tool-") and call.id.startswith("fc_") and got.status == "completed"
    with client.responses.stream(**call_kwargs) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        (streamed,) = stream.get_final_response().output
    assert streamed.name == "get_weather" and json.loads(deltas) == json.loads(streamed.arguments) == \
        json.loads(call.arguments)
    # the call and its output given back as input items: the chat's answer to the same conversation
    followed = items + [{"type": "function_call", "call_id": call.call_id, "name": call.name,
                         "arguments": call.arguments},
                        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    got = client.responses.create(model="tiny", input=followed, max_output_tokens=6, temperature=0,
                                  tools=RESPONSES_TOOLS, tool_choice="none")
    chat = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0, tools=TOOLS, tool_choice="none", messages=conversation + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}]).choices[0].message
    assert got.output_text == chat.content


@pytest.mark.parametrize("body,status,message", [
    ({"input": "x", "previous_response_id": "resp_1"}, 404, "Response with id 'resp_1' not found."),
    ({"input": "x", "background": True}, 400, "background mode"),
    ({"input": "x", "tools": [{"type": "web_search_preview"}]}, 400, "function tools only"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "'input_image' are not supported"),
    ({"input": "x", "max_output_tokens": 1000}, 400, "max_output_tokens=1000 cannot be greater than max_model_len"),
    ({"input": "x", "tool_choice": "required"}, 400, "Tool choice 'required' must be specified with 'tools'"),
    ({"input": "x", "tools": RESPONSES_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400,
     "Tool choice 'function' not found in 'tools' parameter."),
])
def test_bad_responses_requests_are_refused(server, body, status, message):
    """What the Responses API cannot do here is refused in its error shape, not ignored (as vLLM without its
    response store: nothing to continue from, no background mode)."""
    r = httpx.post(f"{server}/v1/responses", headers=_headers(), json={"model": "tiny", **body})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


def test_stored_responses_are_not_found(server, client):
    """Retrieving or cancelling a response by its id: none is stored, so none is found (in the openai client's
    NotFoundError)."""
    from openai import NotFoundError
    with pytest.raises(NotFoundError, match="Response with id 'resp_1' not found."):
        client.responses.retrieve("resp_1")
    with pytest.raises(NotFoundError, match="Response with id 'resp_1' not found."):
        client.responses.cancel("resp_1")
    assert httpx.get(f"{server}/v1/responses/resp_1").status_code == 401   # the API key still applies


def test_lora_adapters_are_served_under_their_own_names(server, client, model_dirs, lora_dirs):
    """--enable-lora --lora-modules tiny-lora=PATH on "tiny": a request naming the adapter runs through it (the
    offline engine with its LoRARequest gives the same answer, plain and streamed, and the answer names the
    adapter); the base model beside it is unchanged; /v1/models lists the adapter with its parent; routes the
    adapter cannot serve refuse it."""
    from shardserve.lora.request import LoRARequest
    offline = LLM(model_dirs("llama"), chat_template=TEMPLATE, dtype="float32", enable_lora=True, **ENGINE)
    lora = LoRARequest("tiny-lora", 1, lora_dirs("llama", "all"))
    expected = offline.generate(PROMPTS, greedy(max_tokens=10), use_tqdm=False, lora_request=lora)
    base = offline.generate(PROMPTS, greedy(max_tokens=10), use_tqdm=False)
    got = client.completions.create(model="tiny-lora", prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected] and got.model == "tiny-lora"
    assert [c.text for c in got.choices] != [o.outputs[0].text for o in base]
    plain = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [c.text for c in plain.choices] == [o.outputs[0].text for o in base]
    chat = offline.chat(MESSAGES, greedy(max_tokens=8), use_tqdm=False, lora_request=lora)[0].outputs[0].text
    chunks = list(client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models", headers=_headers()).json()["data"]}
    assert (models["tiny-lora"]["parent"], models["tiny-lora"]["root"]) == ("tiny", lora.lora_path)
    r = httpx.post(f"{server}/v1/embeddings", headers=_headers(), json={"model": "tiny-lora", "input": "x"})
    assert r.status_code == 400 and "LoRA adapter" in r.json()["error"]["message"]
    # beam search through the adapter: its beams, named after it
    beams = offline.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=2, max_tokens=5), lora_request=lora)[0]
    got = client.completions.create(model="tiny-lora", prompt=PROMPTS[0], max_tokens=5, n=2,
                                    extra_body={"use_beam_search": True})
    prompt_len = len(offline.get_tokenizer().encode(PROMPTS[0]))
    assert [c.text for c in got.choices] == [offline.get_tokenizer().decode(s.tokens[prompt_len:],
                                                                            skip_special_tokens=True)
                                             for s in beams.sequences] and got.model == "tiny-lora"
    offline.shutdown()


def test_lora_adapters_load_and_unload_at_run_time(server, client, model_dirs, lora_dirs, tmp_path):
    """vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING (the session's app sets allow_runtime_lora_updating): once
    /v1/load_lora_adapter has had the model check an adapter, it is served under its name, plain and streamed, as the
    offline engine runs its LoRARequest; load_inplace replaces it; /v1/unload_lora_adapter ends it. What cannot be
    loaded or unloaded is refused in words, and the server serves on."""
    from openai import NotFoundError

    from shardserve.lora.request import LoRARequest
    all_, qv = lora_dirs("llama", "all"), lora_dirs("llama", "qv")
    offline = LLM(model_dirs("llama"), chat_template=TEMPLATE, dtype="float32", enable_lora=True, **ENGINE)

    def post(route: str, **body) -> httpx.Response:
        return httpx.post(f"{server}/v1/{route}_lora_adapter", headers=_headers(), json=body, timeout=60)

    def through(name: str) -> list[str]:
        got = client.completions.create(model=name, prompt=PROMPTS, max_tokens=8, temperature=0)
        assert got.model == name
        return [c.text for c in got.choices]

    def offline_through(lora: LoRARequest) -> list[str]:
        return [o.outputs[0].text for o in offline.generate(PROMPTS, greedy(max_tokens=8), use_tqdm=False,
                                                            lora_request=lora)]
    with pytest.raises(NotFoundError):
        through("rt")
    r = post("load", lora_name="rt", lora_path=all_, base_model_name="tiny")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'rt' added successfully.")
    expected = offline_through(LoRARequest("rt", 1, all_))
    assert through("rt") == expected and expected != through("tiny")
    chunks = list(client.chat.completions.create(model="rt", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline.chat(
        MESSAGES, greedy(max_tokens=8), use_tqdm=False, lora_request=LoRARequest("rt", 1, all_))[0].outputs[0].text
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models", headers=_headers()).json()["data"]}
    assert (models["rt"]["parent"], models["rt"]["root"]) == ("tiny", all_)

    for body, status, message in [
            (dict(lora_name="rt", lora_path=qv, base_model_name="tiny"), 400, "has already been loaded"),
            (dict(lora_name="tiny", lora_path=qv), 400, "conflicts with a served base model"),
            (dict(lora_name="tiny-lora", lora_path=qv, load_inplace=True), 400, "given at start-up"),
            (dict(lora_name="rt2", lora_path=qv), 400, "serves several models"),
            (dict(lora_name="rt2", lora_path=qv, base_model_name="nope"), 404, "does not exist"),
            (dict(lora_name="rt2", lora_path=str(tmp_path), base_model_name="tiny"), 400, "no adapter_config.json"),
            (dict(lora_name="rt2", lora_path=qv, base_model_name="minilm"), 400, "LoRA is not enabled"),
            (dict(lora_name="", lora_path=qv), 400, "Both 'lora_name' and 'lora_path' must be provided")]:
        r = post("load", **body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    with pytest.raises(NotFoundError):
        through("rt2")
    r = httpx.post(f"{server}/v1/embeddings", headers=_headers(), json={"model": "rt", "input": "x"})
    assert r.status_code == 400 and "LoRA adapter" in r.json()["error"]["message"]

    r = post("load", lora_name="rt", lora_path=qv, base_model_name="tiny", load_inplace=True)
    assert r.status_code == 200
    assert through("rt") == offline_through(LoRARequest("rt", 2, qv))
    r = post("unload", lora_name="rt")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'rt' removed successfully.")
    with pytest.raises(NotFoundError):
        through("rt")
    r = post("unload", lora_name="rt")
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'rt' cannot be found."
    r = post("unload", lora_name="tiny-lora")
    assert r.status_code == 400 and "given at start-up" in r.json()["error"]["message"]
    assert "rt" not in {m["id"] for m in httpx.get(f"{server}/v1/models", headers=_headers()).json()["data"]}
    assert through("tiny-lora") == offline_through(LoRARequest("tiny-lora", 1, all_))
    offline.shutdown()


def test_lora_resolver_finds_adapters_by_name(server, client, model_dirs, lora_resolver_dir):
    """vLLM's filesystem resolver (VLLM_LORA_RESOLVER_CACHE_DIR; the session's app has one): a request naming a model
    the app does not know finds the adapter in the folder's subfolder of that name, made for a served model (its
    base_model_name_or_path), and runs through it, loaded from then on. An adapter of another model, or none, is a
    model that does not exist; one the model cannot run is refused in the engine's words."""
    from conftest import make_lora_dir
    from openai import NotFoundError

    from shardserve.lora.request import LoRARequest
    found = make_lora_dir(lora_resolver_dir / "found-lora", model_dirs("llama"), seed=3)
    make_lora_dir(lora_resolver_dir / "other-model", model_dirs("qwen3"))
    make_lora_dir(lora_resolver_dir / "too-big", model_dirs("llama"), rank=32)
    offline = LLM(model_dirs("llama"), dtype="float32", enable_lora=True, **ENGINE)
    expected = offline.generate(PROMPTS, greedy(max_tokens=8), use_tqdm=False,
                                lora_request=LoRARequest("found-lora", 1, found))
    offline.shutdown()
    for _ in range(2):  # found, then loaded
        got = client.completions.create(model="found-lora", prompt=PROMPTS, max_tokens=8, temperature=0)
        assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected] and got.model == "found-lora"
    models = {m["id"]: m for m in httpx.get(f"{server}/v1/models", headers=_headers()).json()["data"]}
    assert (models["found-lora"]["parent"], models["found-lora"]["root"]) == ("tiny", found)
    for name in ("other-model", "missing", "../found-lora", "found-lora/"):
        with pytest.raises(NotFoundError):
            client.completions.create(model=name, prompt="x", max_tokens=2)
    r = httpx.post(f"{server}/v1/completions", headers=_headers(), json={"model": "too-big", "prompt": "x"})
    assert r.status_code == 400 and "greater than max_lora_rank" in r.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/unload_lora_adapter", headers=_headers(),
                      json={"lora_name": "found-lora"}).status_code == 200


@pytest.fixture
def think_client(server, model_dirs):
    """A Llama with thinking tags in its vocabulary, served for one test as "tiny-think" (--reasoning-parser qwen3,
    hermes' tool calls) in an app of its own, deleted after it: the session's app keeps the cluster's spare CPU for
    the replicas the last tests make Serve replace."""
    from conftest import THINK_TEMPLATE
    from ray import serve

    from shardserve.router.app import build_app
    from shardserve.router.spec import ModelSpec
    spec = ModelSpec(model=model_dirs("llama", "thinking"), served_model_name="tiny-think",
                     chat_template=THINK_TEMPLATE, dtype="float32", num_cpus=0.25, reasoning_parser="qwen3",
                     enable_auto_tool_choice=True, tool_call_parser="hermes", **ENGINE)
    serve.run(build_app([spec], api_key=API_KEY), name="think", route_prefix="/think", blocking=False)
    try:
        yield OpenAI(base_url=f"{server}/think/v1", api_key=API_KEY, max_retries=0)
    finally:
        serve.delete("think")


def test_reasoning_is_told_apart_from_the_answer(server, think_client, model_dirs):
    """--reasoning-parser qwen3 ("tiny-think"): the thinking comes back as the message's `reasoning`, the answer as
    its content, where the tool-call parser reads the calls; streamed, the parts add up to the same; the usage counts
    the thinking tokens. The grammar holds only the answer, so a choice constraint makes the random model answer
    with a tool call after it thinks freely (a logit bias on </think> ends the thinking; the offline engine, with
    the same parser, finds a bias that lets it think a few tokens first). enable_thinking false and
    include_reasoning false answer without thinking, and are held to the grammar from the start."""
    from conftest import THINK_TEMPLATE
    offline = LLM(model_dirs("llama", "thinking"), chat_template=THINK_TEMPLATE, dtype="float32",
                  reasoning_parser="qwen3", **ENGINE)
    tokenizer = offline.get_tokenizer()
    end = tokenizer.convert_tokens_to_ids("</think>")
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "F"}}</tool_call>'
    structured = {"choice": ["Let me look." + call]}
    for bias in [b / 10 for b in range(1, 40)]:  # the smallest under which the model thinks, then ends that
        out = offline.chat(MESSAGES, greedy(max_tokens=120, structured_outputs=structured, logit_bias={end: bias},
                                            skip_special_tokens=False), use_tqdm=False, tools=TOOLS)[0].outputs[0]
        thought = out.text.partition("</think>")[0]
        if 0 < len(thought) < len(out.text) and "<tool_call>" not in thought and out.finish_reason == "stop":
            break
    else:
        pytest.fail("no bias ends the thinking after a few tokens")
    assert out.text == thought + "</think>" + structured["choice"][0]
    kwargs = dict(model="tiny-think", messages=MESSAGES, max_tokens=120, temperature=0, tools=TOOLS,
                  logit_bias={str(end): bias}, extra_body={"structured_outputs": structured})
    got = think_client.chat.completions.create(**kwargs)
    message = got.choices[0].message
    assert message.reasoning == thought and message.content == "Let me look." and got.choices[0].finish_reason == \
        "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Rome", "unit": "F"})]
    thinking_tokens = [t for t in out.token_ids[:out.token_ids.index(end)] if t not in tokenizer.all_special_ids]
    assert got.usage.completion_tokens_details.reasoning_tokens == len(thinking_tokens)
    chunks = list(think_client.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    # every chunk counts the thinking so far: up to the end of the thinking, then no more
    so_far = [c.usage.completion_tokens_details.reasoning_tokens for c in chunks if c.choices]
    assert so_far[0] == 0 and so_far == sorted(so_far) and so_far[-1] == len(thinking_tokens)
    assert so_far[[bool(d.content) for d in deltas].index(True)] == len(thinking_tokens)
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == "Let me look."
    assert [c["name"] for c in _streamed_tool_calls(chunks, content=True)[0].values()] == ["get_weather"]
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == len(thinking_tokens)
    # the Responses API: the thinking as a reasoning item before the text, whole and streamed, as the chat's
    chat = think_client.chat.completions.create(model="tiny-think", messages=MESSAGES, max_tokens=40, temperature=0,
                                                logit_bias={str(end): bias})
    kwargs = dict(model="tiny-think", instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"],
                  max_output_tokens=40, temperature=0, extra_body={"logit_bias": {str(end): bias}})
    got = think_client.responses.create(**kwargs)
    assert chat.choices[0].message.reasoning and got.output[0].type == "reasoning"
    assert got.output[0].content[0].text == chat.choices[0].message.reasoning
    assert got.output_text == (chat.choices[0].message.content or "")
    assert got.usage.output_tokens_details.reasoning_tokens == chat.usage.completion_tokens_details.reasoning_tokens
    with think_client.responses.stream(**kwargs) as stream:
        thinking = "".join(e.delta for e in stream if e.type == "response.reasoning_text.delta")
        streamed = stream.get_final_response()
    assert thinking == streamed.output[0].content[0].text == chat.choices[0].message.reasoning
    assert [o.type for o in streamed.output] == [o.type for o in got.output]
    # vLLM's thinking_token_budget: an answer that opens its thinking ("<think>" continued) thinks 2 tokens, then
    # </think> is forced, as offline
    opened = MESSAGES + [{"role": "assistant", "content": "<think>"}]
    template = dict(add_generation_prompt=False, continue_final_message=True)
    out = offline.chat(opened, greedy(max_tokens=8, thinking_token_budget=2, skip_special_tokens=False),
                       use_tqdm=False, **template)[0].outputs[0]
    assert out.token_ids[2] == end
    got = think_client.chat.completions.create(model="tiny-think", messages=opened, max_tokens=8, temperature=0,
                                               extra_body={"thinking_token_budget": 2, **template})
    assert got.usage.completion_tokens_details.reasoning_tokens == 2
    assert got.choices[0].message.reasoning == out.text.partition("</think>")[0]

    # without thinking: the template closes it (enable_thinking false, or reasoning_effort "none"), or it is not
    # returned (include_reasoning false); either way the answer is held to the grammar from its first token
    plain = {"choice": ["Paris", "Rome"]}
    short = dict(model="tiny-think", messages=MESSAGES, max_tokens=20, temperature=0)
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        got = think_client.chat.completions.create(**short, extra_body={"structured_outputs": plain, **extra})
        expected = offline.chat(MESSAGES, greedy(max_tokens=20, structured_outputs=plain), use_tqdm=False,
                                chat_template_kwargs={"enable_thinking": False})[0].outputs[0].text
        message = got.choices[0].message
        assert (message.reasoning, message.content) == (None, expected) and expected in plain["choice"], extra
    got = think_client.chat.completions.create(**short, logprobs=True, extra_body={
        "structured_outputs": plain, "include_reasoning": False}).choices[0]
    # a random model writes no </think>: all of the answer reads as (unreturned) thinking, and its logprobs stay hidden
    assert (got.message.reasoning, got.message.content, got.logprobs) == (None, None, None)
    offline.shutdown()
    # an app without runtime LoRA updating (this one) has no adapter to load
    r = httpx.post(f"{server}/think/v1/load_lora_adapter", headers=_headers(),
                   json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 404 and "at run time is off" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,message,param", [   # in vLLM's words, naming the parameter as vLLM does
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
     "The tool specified in `tool_choice` does not match any of the specified `tools` (parameter=tool_choice)",
     "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {}}, "tools": TOOLS}, "Expected field `name`",
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set.", "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "Invalid value for `tool_choice`: sometimes!", "tool_choice"),
    ({"tools": []}, "`tools` must not be an empty array.", "tools"),
    ({"tool_choice": "required", "tools": TOOLS, "response_format": {"type": "json_object"}}, "cannot be combined",
     None),
    ({"tool_choice": "required", "tools": [{"type": "function"}]}, "Each tool must be", None),
])
def test_bad_tool_choices_are_refused(server, body, message, param):
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(),
                   json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"].get("param") == param


def test_constraints_the_server_cannot_apply_are_refused_not_ignored(server, client):
    """Logits processors, and "auto" tool choice where the model has no tool-call parser, change what a request
    may generate or how it is read: a request asking for them gets a 400 naming the field, not an answer that
    ignores them. Their defaults still pass."""
    for auto in ({"tool_choice": "auto"}, {}):  # tools without a tool_choice: "auto" (OpenAI's default, as vLLM)
        r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(),
                       json={"model": "tiny-tp2", "messages": MESSAGES, "max_tokens": 2, **auto,
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "--enable-auto-tool-choice and --tool-call-parser" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", headers=_headers(),
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2, "logits_processors": ["my.Processor"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logits_processors"
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                         response_format={"type": "text"}, tool_choice="none")
    assert got.choices[0].finish_reason == "length"


def test_browsers_may_call_the_api_from_any_origin_by_default(server):
    """vLLM's CORS defaults: a preflight from any page is allowed (before the API key is checked: browsers
    send none with it), and answers carry Access-Control-Allow-Origin, streamed ones too."""
    origin = {"Origin": "http://page.example"}
    r = httpx.options(f"{server}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(f"{server}/v1/completions", headers={**_headers(), **origin},
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert r.text.rstrip().endswith("data: [DONE]")
    r = httpx.post(f"{server}/v1/completions", headers=origin, json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"  # the page can read why


def test_api_key_required(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_bad_requests_do_not_disturb_a_stream_in_flight(server, client):
    expected = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    errors = []

    def spam():
        for _ in range(5):
            errors.append(httpx.post(f"{server}/v1/completions", headers=_headers(),
                                     json={"model": "tiny", "prompt": "x", "top_p": 7}).status_code)
    thread = threading.Thread(target=spam)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    thread.start()
    text = "".join(c.choices[0].text for c in stream if c.choices)
    thread.join()
    assert text == expected and errors == [400] * 5


def test_concurrent_clients_get_their_own_answers(server, offline):
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    expected = [o.outputs[0].text for o in offline.generate(prompts, greedy(max_tokens=8), use_tqdm=False)]

    async def ask(http: httpx.AsyncClient, prompt: str) -> str:
        r = await http.post(f"{server}/v1/completions", headers=_headers(),
                            json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(ask(http, p) for p in prompts))
    assert asyncio.run(main()) == expected


SENTENCES = ["A man is eating food.", "The new movie is awesome and everyone should see it at least twice.", "Hi"]


def test_embeddings_equal_offline_embed(client):
    offline_embedder = LLM(default_embedding_model())
    expected = [o.outputs.embedding for o in offline_embedder.embed(SENTENCES, use_tqdm=False)]
    got = client.embeddings.create(model="minilm", input=SENTENCES)
    assert [d.index for d in got.data] == [0, 1, 2]
    for d, ref in zip(got.data, expected):
        assert torch.allclose(torch.tensor(d.embedding), torch.tensor(ref), atol=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(SENTENCES)
    b64 = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="base64")
    for d, ref in zip(b64.data, expected):  # little-endian float32 bytes, as OpenAI sends them
        decoded = torch.frombuffer(bytearray(base64.b64decode(d.embedding)), dtype=torch.float32)
        assert torch.allclose(decoded, torch.tensor(ref), atol=1e-5)
    ids = offline_embedder.get_tokenizer().encode(SENTENCES[0])
    by_ids = client.embeddings.create(model="minilm", input=ids)
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), torch.tensor(expected[0]), atol=1e-5)


@pytest.mark.parametrize("route,body,message", [
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 8},
     'Model "minilm" does not support matryoshka representation, changing output dimensions will lead to '
     'poor results.'),
    ("/v1/embeddings", {"model": "tiny", "input": "x"}, "runner"),
    ("/v1/completions", {"model": "minilm", "prompt": "x"}, "runner"),
])
def test_pooling_errors(server, route, body, message):
    r = httpx.post(f"{server}{route}", headers=_headers(), json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def _abandon_a_stream(url: str, model: str, app: str, deployment: str) -> None:
    """Stream a long completion, hang up after two chunks: the engine aborts the request (it does not run
    on to max_tokens) and holds nothing for it."""
    import time

    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    steps = handle.info.remote().result()["num_steps"]
    body = {"model": model, "prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", url, json=body, headers=_headers(), timeout=30) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 2:
                break  # leaving the block closes the connection
    deadline = time.monotonic() + 30
    while (info := handle.info.remote().result())["num_unfinished"]:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.1)
    assert info["num_steps"] - steps < 120, "the request ran on after its client went away"


def test_a_client_that_goes_away_aborts_its_request(server):
    _abandon_a_stream(f"{server}/v1/completions", "tiny", "shardserve", "model-0")


def test_single_model_app_serves_from_its_router_replicas(server, offline, model_dir, lora_dirs):
    """An app of one model has no separate model deployment: the ingress replicas hold the engine (here with
    two tensor-parallel workers in the replica's placement group), and check and run the LoRA adapters loaded at
    run time. It is built as a Serve config builds it (`app_builder`), engine settings included. A killed worker
    turns its /health red and Serve replaces the replica."""
    import os
    import signal
    import time

    from ray import serve

    from shardserve.lora.request import LoRARequest
    from shardserve.router.app import app_builder

    # A Serve config's `args`; a step of 8 tokens prefills every prompt here in chunks.
    args = {"models": [dict(model=model_dir, served_model_name="solo", chat_template=TEMPLATE, dtype="float32",
                            tensor_parallel_size=2, num_cpus=0.25, num_cpus_per_worker=0.25,
                            max_num_batched_tokens=8, block_size=32, enable_prefix_caching=False,
                            scheduling_policy="priority", enable_lora=True, **ENGINE)],
            "allowed_origins": ["http://good.example"], "allowed_credentials": True,
            "allow_runtime_lora_updating": True}
    with pytest.raises(ValueError, match="block_size must be at least 1"):  # refused before anything starts
        app_builder({"models": [dict(args["models"][0], block_size=0)]})
    serve.run(app_builder(args), name="solo", route_prefix="/solo", blocking=False)
    try:
        status = serve.status().applications["solo"]
        assert list(status.deployments) == ["model-0"]  # the router, holding the model
        solo = OpenAI(base_url=f"{server}/solo/v1", api_key="unused", max_retries=0)
        expected = offline.generate(PROMPTS, greedy(max_tokens=10), use_tqdm=False)
        got = solo.completions.create(model="solo", prompt=PROMPTS, max_tokens=10, temperature=0,
                                      extra_body={"priority": -5})  # the priority policy takes any priority
        assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
        chunks = list(solo.chat.completions.create(model="solo", messages=MESSAGES, max_tokens=8, temperature=0,
                                                   stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            offline.chat(MESSAGES, greedy(max_tokens=8), use_tqdm=False)[0].outputs[0].text
        assert [m.id for m in solo.models.list().data] == ["solo"]
        assert httpx.get(f"{server}/solo/health").status_code == 200
        for origin, allowed in [("http://good.example", True), ("http://evil.example", False)]:  # the config's CORS
            r = httpx.options(f"{server}/solo/v1/models",
                              headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
            assert r.status_code == (200 if allowed else 400)
            assert r.headers.get("access-control-allow-origin") == (origin if allowed else None)
            assert not allowed or r.headers["access-control-allow-credentials"] == "true"
        r = httpx.post(f"{server}/solo/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404
        r = httpx.post(f"{server}/solo/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "solo-lora", "lora_path": lora_dirs("llama", "all")})
        assert r.status_code == 200, r.text
        with_lora = LLM(model_dir, dtype="float32", enable_lora=True, **ENGINE)
        expected = with_lora.generate(PROMPTS, greedy(max_tokens=10), use_tqdm=False,
                                      lora_request=LoRARequest("solo-lora", 1, lora_dirs("llama", "all")))
        with_lora.shutdown()
        got = solo.completions.create(model="solo-lora", prompt=PROMPTS, max_tokens=10, temperature=0)
        assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
        info = serve.get_deployment_handle("model-0", app_name="solo").info.remote().result()
        assert info["id"] == "solo" and info["num_steps"] > 0 and len(info["worker_pids"]) == 2
        assert (info["max_num_batched_tokens"], info["block_size"], info["enable_prefix_caching"],
                info["scheduling_policy"]) == (8, 32, False, "priority")
        assert info["gc_frozen"] > 10_000  # start-up's objects are out of the collector's reach
        _abandon_a_stream(f"{server}/solo/v1/completions", "solo", "solo", "model-0")

        os.kill(info["worker_pids"][0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(f"{server}/solo/health").status_code == 200:
            assert time.monotonic() < deadline, "/health stayed green with a dead worker"
            time.sleep(0.5)
        _wait_until_serving_again(f"{server}/solo", "solo")  # Serve's health check replaces the replica
        # Stopping an ingress replica behind Serve's HAProxy waits 2 s for HAProxy to drop it, not the 30 s
        # Serve gives load balancers outside the cluster (serve_environment).
        started = time.monotonic()
        serve.delete("solo")
        assert time.monotonic() - started < 15
        assert httpx.get(f"{server}/solo/health").status_code == 404
    finally:
        serve.delete("solo")


def test_dead_worker_turns_health_red_until_serve_replaces_the_replica(server, client):
    """Runs last: kills a tensor-parallel worker process of "tiny-tp2" as a crash would."""
    import os
    import signal
    import time

    from ray import serve

    info = serve.get_deployment_handle("model-1", app_name="shardserve").info.remote().result()
    assert info["id"] == "tiny-tp2" and len(info["worker_pids"]) == 2
    os.kill(info["worker_pids"][1], signal.SIGKILL)

    deadline = time.monotonic() + 15
    while httpx.get(f"{server}/health").status_code == 200:
        assert time.monotonic() < deadline, "/health stayed green with a dead worker"
        time.sleep(0.5)
    r = httpx.post(f"{server}/v1/completions", headers=_headers(),
                   json={"model": "tiny-tp2", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code in (200, 503)  # 200 only if Serve already replaced the replica
    # "tiny" never stopped serving.
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None
    # Serve's health check replaces the broken replica (with new workers); the model serves again.
    _wait_until_serving_again(server, "tiny-tp2", headers=_headers())


def _wait_until_serving_again(base: str, model: str, headers: dict | None = None, within: float = 120) -> None:
    """Waits for `model` behind `base` to answer a completion and its /health to turn green again. While no
    replica of an app is up, HAProxy hands its requests to Serve's proxy, which holds them until the new replica
    is ready, so a request may take most of the wait: it gets all the time left, not a fixed share."""
    import time
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{model} did not come back within {within} s"
        try:
            r = httpx.post(f"{base}/v1/completions", headers=headers, timeout=left,
                           json={"model": model, "prompt": "x", "max_tokens": 2})
            if r.status_code == 200 and httpx.get(f"{base}/health", timeout=left).status_code == 200:
                return
        except httpx.TimeoutException:
            continue  # the deadline's assert says so
        time.sleep(1)


def test_gpu_specs_reserve_a_gpu_for_whatever_runs_the_model():
    """On a GPU cluster a one-shard replica runs the model itself and needs the GPU; with TP x PP > 1 the
    workers in the replica's placement group do, and the replica does not."""
    from shardserve.router.spec import ModelSpec
    one = ModelSpec(model="m", device="cuda").deployment_options(0)
    assert one["ray_actor_options"]["num_gpus"] == 1 and "placement_group_bundles" not in one
    tp = ModelSpec(model="m", device="cuda", tensor_parallel_size=2, num_cpus=1, num_cpus_per_worker=0.5)
    options = tp.deployment_options(0)
    assert "num_gpus" not in options["ray_actor_options"]
    assert options["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]
    assert tp.engine_config().device == "cuda"  # decided here, not by the GPU-less replica
    cpu = ModelSpec(model="m", device="cpu", tensor_parallel_size=2, num_cpus=1, num_cpus_per_worker=0.5)
    assert cpu.deployment_options(0)["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert "num_gpus" not in ModelSpec(model="m", device="cpu").deployment_options(0)["ray_actor_options"]
