"""Pooling requests on the engine: prefill-only, packed into shared steps without padding, streamed through
the token budget, holding no KV cache, and driven through the same add / step / abort surface as generation.
"""
from __future__ import annotations

import pytest
import torch

from shardserve import LLM, PoolingParams, TokensPrompt
from shardserve.outputs import PoolingRequestOutput


@pytest.fixture(scope="module")
def bert_dir(encoder_dirs):
    return encoder_dirs("bert")


def _prompts(n: int) -> list[TokensPrompt]:
    g = torch.Generator().manual_seed(0)
    return [TokensPrompt(prompt_token_ids=[2] + torch.randint(5, 200, (int(length),), generator=g).tolist() + [3])
            for length in torch.randint(1, 30, (n,), generator=g)]


def test_short_requests_share_one_step_and_keep_no_kv(bert_dir):
    llm = LLM(bert_dir)
    engine = llm.llm_engine
    assert engine.scheduler.block_manager.num_blocks == 0
    assert all(cache.shape[1] == 0 for cache in engine.executor.worker.kv_caches)
    prompts = _prompts(100)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, PoolingParams(task="embed"))
    outputs = engine.step()  # one step, one packed forward over every prompt's tokens
    assert len(outputs) == 100 and all(isinstance(o, PoolingRequestOutput) and o.finished for o in outputs)
    assert not engine.has_unfinished_requests() and not engine.scheduler.requests
    assert not engine.executor.worker.runner.requests and not engine.scheduler.block_manager.req_blocks
    # the same prompts one at a time give the same embeddings: packing leaks nothing between prompts
    by_id = {o.request_id: o.outputs.data for o in outputs}
    for i in (0, 37, 99):
        (alone,) = llm.encode(prompts[i], pooling_task="embed", use_tqdm=False)
        torch.testing.assert_close(alone.outputs.data, by_id[f"r{i}"], rtol=1e-5, atol=1e-6)


def test_long_batches_stream_within_the_token_budget(bert_dir):
    budget = 64
    llm = LLM(bert_dir, max_model_len=32, max_num_batched_tokens=budget)
    engine = llm.llm_engine
    prompts = _prompts(30)
    lengths = [len(p["prompt_token_ids"]) for p in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, PoolingParams(task="embed"))
    seen, steps = {}, 0
    while engine.has_unfinished_requests():
        scheduled_before = sum(len(r.prompt_token_ids) for r in engine.scheduler.waiting)
        for out in engine.step():
            seen[out.request_id] = out.outputs.data
        steps += 1
        done = scheduled_before - sum(len(r.prompt_token_ids) for r in engine.scheduler.waiting)
        assert 0 < done <= budget  # whole prompts, never more than the budget
    assert len(seen) == 30 and steps >= sum(lengths) / budget
    reference = LLM(bert_dir, max_model_len=32).encode(prompts, pooling_task="embed", use_tqdm=False)
    for i, out in enumerate(reference):
        torch.testing.assert_close(seen[str(i)], out.outputs.data, rtol=1e-5, atol=1e-6)


def test_abort_and_engine_surface(bert_dir):
    engine = LLM(bert_dir).llm_engine
    engine.add_request("a", "The quick brown fox", PoolingParams())  # the model's default task: embed
    engine.add_request("b", "jumps over the lazy dog", PoolingParams(task="token_embed"))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "again", PoolingParams())
    engine.abort_request("a")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["b"] and outputs[0].outputs.data.dim() == 2
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting


def test_budget_below_model_length_is_refused(bert_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens=16 is below max_model_len=32"):
        LLM(bert_dir, max_model_len=32, max_num_batched_tokens=16)
