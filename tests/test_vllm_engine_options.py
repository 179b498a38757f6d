"""vLLM engine options a vLLM script or command line passes, taken for what they do here: enable_chunked_prefill
both ways; kv_cache_dtype, quantization and tokenizer_mode at the values that mean what shardserve does, and the
others refused with what it does instead (not an unexpected-argument error, and not silently)."""
from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.cli import build_parser, main, model_specs
from shardserve.config import EngineConfig
from shardserve.engine.speculative import SpeculativeConfig

PROMPTS = [TokensPrompt(prompt_token_ids=[3 + (i + 7 * j) % 300 for j in range(n)])
           for i, n in enumerate((3, 40, 57, 9))]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_chunked_prefill_off_computes_each_prompt_whole_with_the_same_tokens(model_dirs):
    chunked = LLM(model_dirs("llama"), dtype="float32", max_model_len=64, max_num_batched_tokens=64)
    whole = LLM(model_dirs("llama"), dtype="float32", max_model_len=64, max_num_batched_tokens=64,
                enable_chunked_prefill=False)
    assert chunked.llm_engine.scheduler.chunked_prefill and not whole.llm_engine.scheduler.chunked_prefill
    steps = []
    schedule = whole.llm_engine.scheduler.schedule

    def recorded():
        out = schedule()
        steps.append([(s.num_computed_tokens, len(s.token_ids)) for s in out.scheduled])
        return out
    whole.llm_engine.scheduler.schedule = recorded
    assert _tokens(whole) == _tokens(chunked)
    # every prompt's tokens in one step (no two share a prefix block; 57 + 40 > 64: the second waited a step)
    prefills = [n for step in steps for start, n in step if start == 0]
    assert sorted(prefills) == [3, 9, 40, 57]
    with pytest.raises(ValueError, match="max_num_batched_tokens=32 is below max_model_len=64: without chunked "
                                         "prefill each prompt is computed whole"):
        LLM(model_dirs("llama"), max_model_len=64, max_num_batched_tokens=32, enable_chunked_prefill=False)


def test_options_at_what_shardserve_does_are_taken(model_dirs):
    llm = LLM(model_dirs("llama"), dtype="float32", kv_cache_dtype="float32", quantization=None, tokenizer_mode="hf",
              enable_chunked_prefill=True)
    assert _tokens(llm)[0]


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8' is not supported: the KV cache is kept in the model's dtype"),
    (dict(quantization="awq"), "quantization 'awq' is not supported: shardserve runs unquantized checkpoints, and "
                               "GGUF files"),
    (dict(tokenizer_mode="mistral"), "tokenizer_mode 'mistral' is not supported"),
])
def test_other_values_are_refused_with_what_shardserve_does(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **options)


def test_vllm_options_that_change_nothing_here_are_taken_at_those_values(model_dirs):
    """A vLLM script's LLM(...) options with no counterpart here are taken at the values that change nothing
    (the default, or any for those that only tune what shardserve does its own way); others say why not."""
    llm = LLM(model_dirs("llama"), dtype="float32", data_parallel_size=1, enable_sleep_mode=False,
              speculative_config=None, cpu_offload_gb=0, logprobs_mode="raw_logprobs", model_impl="auto",
              disable_custom_all_reduce=True, use_tqdm_on_load=False, served_model_name="m", swap_space=4,
              disable_log_stats=True, enable_expert_parallel=False, disable_sliding_window=False)
    assert _tokens(llm)[0]
    llm.shutdown()
    for options, message in ((dict(data_parallel_size=2), "data_parallel_size=2 is not supported: data "
                                                          "parallelism here is replicas"),
                             (dict(enable_sleep_mode=True), "sleep mode is not built"),
                             (dict(speculative_config={"method": "eagle", "num_speculative_tokens": 2}),
                              "method 'eagle' is not built: only 'ngram'"),
                             (dict(logprobs_mode="processed_logprobs"), "logprobs are the model's own")):
        with pytest.raises(ValueError, match=message):
            LLM(model_dirs("llama"), **options)
    with pytest.raises(TypeError, match="unexpected arguments: no_such_option"):
        LLM(model_dirs("llama"), no_such_option=1)


def test_values_that_contradict_the_checkpoint_are_refused(model_dirs):
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'bfloat16' is not supported: the KV cache is kept in the "
                                         r"model's dtype \(float32\)"):
        LLM(model_dirs("llama"), dtype="float32", kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="quantization 'gguf' needs a GGUF file"):
        LLM(model_dirs("llama"), quantization="gguf")


def test_serve_flags(monkeypatch):
    def spec(*flags):
        return model_specs(build_parser().parse_args(["serve", "a", *flags]))[0]
    config = spec("--no-enable-chunked-prefill", "--kv-cache-dtype", "auto", "-q", "gguf", "--tokenizer-mode",
                  "hf").engine_config()
    assert (config.enable_chunked_prefill, config.kv_cache_dtype, config.quantization, config.tokenizer_mode) == \
        (False, "auto", "gguf", "hf")
    assert spec("--enable-chunked-prefill").enable_chunked_prefill is True
    assert spec("--load-format", "dummy").engine_config().load_format == "dummy"
    assert spec("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
                ).engine_config().speculative_config == SpeculativeConfig(3, 2, 2)
    assert spec("--chat-template-content-format", "openai").chat_template_content_format == "openai"
    assert spec().enable_chunked_prefill is None
    monkeypatch.setattr("shardserve.cluster.ray_cluster.connect", lambda address: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit, match="shardserve serve: error: kv_cache_dtype 'fp8_e4m3' is not supported"):
        main(["serve", "a", "--kv-cache-dtype", "fp8_e4m3"])
    for bad in (["--load-format", "tensorizer"], ["--chat-template-content-format", "parts"]):
        with pytest.raises(SystemExit):  # not one of argparse's choices
            main(["serve", "a", *bad])
