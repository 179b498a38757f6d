"""The engine's own surface (add / abort / step), detokenization, and memory."""
from __future__ import annotations

import gc
import resource

import pytest
import torch

from conftest import build_tokenizer
from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(model_dirs("llama"), dtype="float32")


def test_step_loop_streams_partial_outputs_and_abort_frees_blocks(llm):
    engine = llm.llm_engine
    free_before = engine.scheduler.block_manager.num_free_blocks
    engine.add_request("a", TokensPrompt(prompt_token_ids=[1, 5, 6, 7]),
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.add_request("b", "hello world", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "again")
    seen = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(len(out.outputs[0].token_ids))
            if out.request_id == "b" and len(out.outputs[0].token_ids) == 3:
                engine.abort_request("b")
    assert seen["a"] == [1, 2, 3, 4, 5, 6]
    assert seen["b"] == [1, 2, 3]
    assert engine.scheduler.block_manager.num_free_blocks == free_before
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_priority_policy_serves_the_most_urgent_first(model_dirs, llm):
    """vLLM's scheduling_policy="priority": lower priority values run first, arrival breaking ties; a
    request's text is what it would be in any order."""
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10], [1, 11, 12, 13, 14]]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    priorities = [2, -1, 0, -1]
    ordered = LLM(model_dirs("llama"), dtype="float32", scheduling_policy="priority", max_num_seqs=1)
    engine = ordered.llm_engine
    for i, (prompt, priority) in enumerate(zip(prompts, priorities)):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params, priority=priority)
    finished = []
    while engine.has_unfinished_requests():
        finished += [out.request_id for out in engine.step() if out.finished]
    assert finished == ["1", "3", "2", "0"]
    tokens = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    by_priority = ordered.generate(tokens, params, use_tqdm=False, priority=priorities)
    in_order = llm.generate(tokens, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_priority] == [o.outputs[0].token_ids for o in in_order]


def test_priority_needs_the_priority_policy(model_dirs, llm):
    """Under fcfs a priority would be ignored: any but 0 is refused, before anything is queued."""
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        llm.generate(["a", "b"], priority=[0, 1], use_tqdm=False)
    with pytest.raises(ValueError, match="Got 2 priorities for 1 prompts"):
        llm.generate("a", priority=[0, 0], use_tqdm=False)
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.chat([{"role": "user", "content": "hi"}], chat_template="{{ messages[0]['content'] }}", priority=0.5,
                 use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate("a", SamplingParams(max_tokens=2), priority=0, use_tqdm=False)) == 1
    with pytest.raises(ValueError, match="scheduling_policy must be 'fcfs' or 'priority'"):
        LLM(model_dirs("llama"), scheduling_policy="lifo")


def test_tokenization_kwargs_truncate_and_leave_out_special_tokens(llm):
    """vLLM's tokenization_kwargs: truncate_prompt_tokens keeps that many of the prompt's tokens, from the side
    truncation_side says (-1: the model's length less one); add_special_tokens=False leaves out the BOS. The
    truncated prompt generates what those tokens alone generate."""
    tokenizer = llm.get_tokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 3
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(prompt, **kwargs):
        return llm.generate(prompt, greedy, use_tqdm=False, tokenization_kwargs=kwargs)[0]
    for side, kept in [("left", ids[-7:]), ("right", ids[:7])]:
        out = run(text, truncate_prompt_tokens=7, truncation_side=side)
        assert out.prompt_token_ids == kept and out.prompt == tokenizer.decode(kept)
        assert out.outputs[0].token_ids == run(TokensPrompt(prompt_token_ids=kept)).outputs[0].token_ids
    assert run(TokensPrompt(prompt_token_ids=ids), truncate_prompt_tokens=3).prompt_token_ids == ids[:3]
    assert run(text, truncate_prompt_tokens=len(ids) + 5).prompt_token_ids == ids   # nothing to cut
    assert run(text, add_special_tokens=False).prompt_token_ids == ids[1:]
    max_len = llm.llm_engine.max_model_len
    too_long = TokensPrompt(prompt_token_ids=[5] * (max_len + 10))
    assert len(run(too_long, truncate_prompt_tokens=-1).prompt_token_ids) == max_len - 1
    with pytest.raises(ValueError, match="cannot be greater than max_model_len"):
        run(text, truncate_prompt_tokens=max_len + 1)
    with pytest.raises(ValueError, match="truncation_side must be"):
        run(text, truncate_prompt_tokens=3, truncation_side="middle")
    with pytest.raises(TypeError):
        run(text, max_length=3)
    assert not llm.llm_engine.has_unfinished_requests()


def test_cache_salt_keeps_prefix_cache_within_its_salt_and_reset_empties_it(llm):
    """vLLM's cache_salt: a prompt finds cached blocks only of prompts with the same salt (no salt is a salt of
    its own), so a tenant cannot learn by timing what another asked. Outputs do not change.
    `reset_prefix_cache` empties the cache once no request holds blocks."""
    ids = [1] + list(range(10, 60))  # three full blocks of 16 and more
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def run(salt=None):
        prompt = TokensPrompt(prompt_token_ids=ids, **({"cache_salt": salt} if salt else {}))
        return llm.generate(prompt, greedy, use_tqdm=False)[0]
    first = run("tenant-a")
    assert first.num_cached_tokens == 0
    again = run("tenant-a")
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids
    for other in ("tenant-b", None):
        out = run(other)
        assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == first.outputs[0].token_ids
    assert run(None).num_cached_tokens == 48   # the unsalted prompt's own blocks
    engine = llm.llm_engine
    engine.add_request("holder", TokensPrompt(prompt_token_ids=ids), greedy)
    engine.step()
    assert not llm.reset_prefix_cache()        # a running request holds blocks: refused, as in vLLM
    engine.abort_request("holder")
    assert llm.reset_prefix_cache()
    assert run(None).num_cached_tokens == 0 and run("tenant-a").num_cached_tokens == 0
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt": "hi", "cache_salt": ""}, greedy, use_tqdm=False)


def test_skip_reading_prefix_cache_computes_the_whole_prompt(llm):
    """vLLM's skip_reading_prefix_cache: the prompt is computed whole though the cache holds its blocks (the
    answer is the same); without it the blocks are found again."""
    ids = [1] + list(range(70, 120))
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def run(**skip):
        return llm.generate(TokensPrompt(prompt_token_ids=ids), greedy.clone(**skip), use_tqdm=False)[0]
    first = run()
    skipped = run(skip_reading_prefix_cache=True)
    assert skipped.num_cached_tokens == 0 and skipped.outputs[0].token_ids == first.outputs[0].token_ids
    assert run().num_cached_tokens == 48


def test_stream_interval_batches_tokens_into_fewer_outputs(model_dirs, llm):
    """vLLM's --stream-interval: a streamed request reports its first token at once, then every `interval` new
    tokens (the engine's, raised by the request's own), and when it finishes; the tokens and text are those of
    a request that reports every token. n > 1 reports when any completion is due."""
    engine = LLM(model_dirs("llama"), dtype="float32", stream_interval=3).llm_engine
    every_token = llm.generate(TokensPrompt(prompt_token_ids=[1, 5, 6, 7]),
                               SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    requests = {"engine's": (None, 1), "request's": (5, 1), "below the engine's": (2, 1), "n=2": (None, 2)}
    for request_id, (interval, n) in requests.items():  # top_k=1: greedy, which n > 1 may not say with temperature 0
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=[1, 5, 6, 7]),
                           SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True, n=n,
                                          stream_interval=interval))
    seen = {request_id: [] for request_id in requests}
    last = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append([len(c.token_ids) for c in out.outputs])
            last[out.request_id] = out
    assert seen["engine's"] == [[1], [4], [7], [10]]
    assert seen["below the engine's"] == [[1], [4], [7], [10]]   # the engine's interval is the floor
    assert seen["request's"] == [[1], [6], [10]]
    assert seen["n=2"] == [[1, 1], [4, 4], [7, 7], [10, 10]]
    for out in last.values():
        assert out.finished and all(c.token_ids == every_token.outputs[0].token_ids for c in out.outputs)
        assert all(c.text == every_token.outputs[0].text for c in out.outputs)
    with pytest.raises(ValueError, match="stream_interval"):
        LLM(model_dirs("llama"), dtype="float32", stream_interval=0)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_incremental_detokenization_equals_full_decode(kind):
    tokenizer = build_tokenizer(kind)
    texts = ["Caf\u00e9 cr\u00e8me \u4f60\u597d\uff0c\u4e16\u754c \U0001F600 done", "  leading spaces and\nnew lines"]
    g = torch.Generator().manual_seed(0)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sequences.append(torch.randint(3, len(tokenizer), (60,), generator=g).tolist())
    # ending inside the emoji (its bytes are tokens of their own): the token that starts it is held back
    cut = sequences[0][:-5]
    prompt = tokenizer.encode("The prompt", add_special_tokens=True)
    for ids in sequences + [cut]:
        expected = tokenizer.decode(prompt + ids, skip_special_tokens=True)[
            len(tokenizer.decode(prompt, skip_special_tokens=True)):]
        # Without stop strings the text is decoded when read: read after every token (streamed), every third,
        # and only at the end, it is the same text, and it only ever grows.
        finals = []
        for read_every in (1, 3, None):
            detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
            text = ""
            for i, token in enumerate(ids):
                detok.append(token)
                if read_every and (i + 1) % read_every == 0:
                    assert detok.output_text.startswith(text)
                    text = detok.output_text
            if ids is cut:
                assert expected.startswith(detok.output_text) and len(detok.output_text) > 10
            else:
                assert detok.output_text == expected.rstrip("\ufffd") or detok.output_text == expected
            finals.append(detok.output_text)
        assert finals[0] == finals[1] == finals[2]


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_one_token_reads_through_decode_stream_give_the_windows_text(kind, skip_special, monkeypatch):
    """A read of one new token goes through tokenizers' DecodeStream; reads of several, the decodes of the window.
    Random tokens (special ones, bytes of characters, stop strings among them) read in a random pattern (one new
    token, several, the same again) give, text after text, what the window decodes alone give."""
    import random

    from shardserve.engine import detokenizer
    tokenizer = build_tokenizer(kind)
    rng = random.Random(7)
    prompt = tokenizer.encode("The prompt", add_special_tokens=True)
    for trial in range(6):
        ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
        reads = [rng.choice([1, 1, 1, 2, 5]) for _ in range(300)]
        stop = ["e d", "\u00e9"] if trial % 2 else []
        texts = []
        for stream in (True, False):
            if not stream:
                monkeypatch.setattr(detokenizer, "rust_tokenizer", lambda tokenizer: None)
            params = SamplingParams(skip_special_tokens=skip_special, stop=stop, include_stop_str_in_output=True)
            detok, seen, i = IncrementalDetokenizer(tokenizer, prompt, params), [], 0
            for n in reads:
                for token in ids[i:i + n]:
                    if detok.append(token) is not None:
                        break
                else:
                    i += n
                    seen.append(detok.output_text)
                    seen.append(detok.output_text)   # read again, nothing new
                    continue
                seen.append(detok.output_text)
                break
            texts.append(seen)
            assert bool(detok._rust) == stream   # the stream in use, not given up on (or, patched away, not)
        assert texts[0] == texts[1]
        monkeypatch.undo()


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_logprob_tokens_read_whole_characters_as_vllm(kind):
    """A token that ends inside a UTF-8 character reads "" in logprobs, and the token that completes it reads
    the whole character (vLLM's rule), so the tokens of a text read back as the text."""
    from shardserve.engine.detokenizer import logprob_token_text
    tokenizer = build_tokenizer(kind)
    text = "Caf\u00e9 \u4f60\u597d \U0001F600!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [logprob_token_text(tokenizer, t, ids[:i]) for i, t in enumerate(ids)]
    # (SentencePiece: the first word's space too, which decoding a whole text drops)
    assert "".join(pieces) == (" " if kind == "metaspace" else "") + tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    if kind == "bytelevel":  # its characters here take more than one token each
        assert any(p == "" for p in pieces)


def test_stop_string_spanning_tokens():
    tokenizer = build_tokenizer("bytelevel")
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    assert len(ids) > 5
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=["n fox ju"]))
    hit = None
    for i, token in enumerate(ids):
        hit = detok.append(token)
        if hit:
            break
    assert hit == "n fox ju"
    assert detok.output_text == "The quick brow"


@pytest.mark.parametrize("include_stop", [False, True])
def test_streamed_text_never_shows_a_stop_string_it_later_cuts(llm, include_stop):
    """vLLM's rule: while a request runs, the last len(longest stop) - 1 characters of its text are held back
    (they may begin a stop string that is then cut off), so each streamed text is a prefix of the final one."""
    engine = llm.llm_engine
    prompt = TokensPrompt(prompt_token_ids=[1, 5, 6, 7])
    free_params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine.add_request("free", prompt, free_params)
    boundaries = []  # where each step's text ended
    while engine.has_unfinished_requests():
        for out in engine.step():
            boundaries.append(len(out.outputs[0].text))
    free = out.outputs[0].text
    # a stop string across a token boundary, found there first
    stop = next(free[b - 2:b + 2] for b in boundaries[len(boundaries) // 3:]
                if b >= 2 and b + 2 <= len(free) and free.index(free[b - 2:b + 2]) == b - 2)
    end = free.index(stop) + (len(stop) if include_stop else 0)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include_stop)
    engine.add_request("stopped", prompt, params)
    texts = []
    while engine.has_unfinished_requests():
        texts.extend(out.outputs[0].text for out in engine.step())
    assert texts[-1] == free[:end] == llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    assert all(texts[-1].startswith(text) for text in texts)


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    """RequestOutputKind.DELTA (vLLM's): each output carries only what is new for each completion that
    progressed (tokens, text, logprobs), the prompt logprobs once in the first; put together they are the
    cumulative outputs' last one."""
    from shardserve.sampling_params import RequestOutputKind
    engine = llm.llm_engine
    prompt = TokensPrompt(prompt_token_ids=[1, 5, 6, 7, 9])

    def run(kind):
        params = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=12, ignore_eos=True, logprobs=2,
                                prompt_logprobs=1, output_kind=kind)
        engine.add_request(kind.name, prompt, params)
        outputs = []
        while engine.has_unfinished_requests():
            outputs.extend(engine.step())
        return outputs

    final = run(RequestOutputKind.CUMULATIVE)[-1]
    deltas = run(RequestOutputKind.DELTA)
    assert deltas[-1].finished and not any(out.finished for out in deltas[:-1])
    assert deltas[0].prompt_logprobs == final.prompt_logprobs and len(final.prompt_logprobs) == 5
    assert all(out.prompt_logprobs is None for out in deltas[1:])
    for c in final.outputs:
        parts = [d for out in deltas for d in out.outputs if d.index == c.index]
        assert all(d.token_ids for d in parts)  # nothing new: left out
        assert [t for d in parts for t in d.token_ids] == c.token_ids and len(c.token_ids) == 12
        assert "".join(d.text for d in parts) == c.text
        assert [e for d in parts for e in d.logprobs] == c.logprobs
        assert parts[-1].finish_reason == c.finish_reason == "length"
        assert parts[-1].cumulative_logprob == c.cumulative_logprob
    folded = deltas[0]
    for out in deltas[1:]:
        folded.add(out)  # what a consumer that fell behind gets
    assert [(c.index, c.text, c.token_ids, c.logprobs) for c in folded.outputs] == \
        [(c.index, c.text, c.token_ids, c.logprobs) for c in final.outputs] and folded.finished


def test_kv_cache_is_allocated_once_and_rss_stays_flat(llm):
    worker = llm.llm_engine.executor.worker
    pointers = [c.data_ptr() for c in worker.kv_caches]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=[1, 3 + i % 50, 4 + i % 7]) for i in range(1000)]

    def rss_mib():
        gc.collect()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    llm.generate(prompts[:200], params, use_tqdm=False)  # warm allocator and caches
    before = rss_mib()
    for _ in range(2):
        llm.generate(prompts, params, use_tqdm=False)
    after = rss_mib()
    assert [c.data_ptr() for c in worker.kv_caches] == pointers
    assert after - before < 64, f"peak RSS grew by {after - before:.0f} MiB over 2,000 requests"
    assert not llm.llm_engine.parents and not llm.llm_engine.scheduler.requests
    assert not llm.llm_engine.scheduler.block_manager.req_blocks
    assert not worker.runner.requests


def test_gpu_kv_budget_counts_weights_activations_and_memory_outside_torch():
    from shardserve.workers.worker import kv_cache_budget
    gib = 1 << 30
    # 80 GiB device at 0.9: 72 GiB for the engine, less 10 GiB of peak torch use and 1.5 outside torch
    assert kv_cache_budget(80 * gib, 0.9, 10 * gib, gib + gib // 2) == int(72 * gib) - 10 * gib - gib - gib // 2
    assert kv_cache_budget(80 * gib, 0.1, 10 * gib, 0) < 0  # too small: the engine then refuses to start


def test_profile_run_covers_a_full_step(model_dirs):
    """The memory profile's forward (run on GPUs before sizing the KV cache) over the largest step the
    scheduler may send, on every stage's path; here on the CPU for its shapes."""
    from shardserve import LLM
    llm = LLM(model_dirs("qwen3"), max_model_len=48, max_num_batched_tokens=100, max_num_seqs=4)
    worker = llm.llm_engine.executor.worker
    assert worker.config.max_num_batched_tokens == 100 and worker.config.max_model_len == 48
    worker.profile_run(100, 48)  # 48 + 48 + 4 tokens, logits for 4 rows
    assert worker.runner.graphs is None  # no CUDA graphs on a CPU


def test_cuda_graph_sizes_cover_every_batch():
    from shardserve.workers.cuda_graph import default_graph_sizes
    assert default_graph_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert default_graph_sizes(5) == [1, 2, 4, 5]
    assert default_graph_sizes(1) == [1]
    assert default_graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("arch, architecture", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                                ("opt", "OPTForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                                ("qwen2_moe", "Qwen2MoeForCausalLM")])
def test_models_build_entirely_on_the_target_device(arch, architecture):
    """Workers build models inside `torch.device(device)`: every parameter and buffer (rotary tables with
    llama3 scaling included) must land there, or a GPU forward mixes devices. The meta device stands in."""
    from conftest import _config
    from shardserve.models.registry import resolve_model_class
    config = _config(arch, 300)
    config.architectures = [architecture]
    with torch.device("meta"):
        model = resolve_model_class(config, "generate", "none")(config)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_offline_calls_keep_the_existing_heap_out_of_collection(llm, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    seen = []
    step = llm.llm_engine.step
    monkeypatch.setattr(llm.llm_engine, "step", lambda: seen.append(gc.get_freeze_count()) or step())
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6])], params, use_tqdm=False)
    assert seen and min(seen) > 10_000  # torch's, transformers' and the model's objects, frozen meanwhile
    assert gc.get_freeze_count() == 0   # and collectable again afterwards
    gc.freeze()  # a program that froze its own heap keeps exactly that
    try:
        frozen = gc.get_freeze_count()
        llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6])], params, use_tqdm=False)
        assert gc.get_freeze_count() >= frozen - 100  # still frozen (less what refcounting freed meanwhile)
    finally:
        gc.unfreeze()
