"""vLLM's compilation options (`compilation_config`, `cudagraph_capture_sizes`, `max_cudagraph_capture_size`,
`optimization_level`, and the older `cuda_graph_sizes`) as a vLLM script or command line passes them: which decode
batch sizes the engine captures as CUDA graphs, and the errors vLLM gives for what it refuses. On a GPU,
tests/test_gpu.py captures the sizes these give."""
from __future__ import annotations

import logging

import pytest

from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.cli import build_parser, main, model_specs
from shardserve.config import EngineConfig
from shardserve.workers.cuda_graph import default_graph_sizes


def sizes(**options) -> list[int]:
    return EngineConfig(model="m", max_num_seqs=64, **options).cuda_graph_batch_sizes()


def test_default_sizes_follow_max_num_seqs_and_the_largest_capture_size():
    assert sizes() == default_graph_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert sizes(max_cudagraph_capture_size=20) == [1, 2, 4, 8, 16, 20]
    assert sizes(compilation_config={"max_cudagraph_capture_size": 100}) == default_graph_sizes(64)
    assert sizes(max_cudagraph_capture_size=0) == []   # vLLM's: nothing to capture


@pytest.mark.parametrize("options", [dict(cudagraph_capture_sizes=[8, 1, 4, 4]), dict(cuda_graph_sizes=[4, 1, 8]),
                                     dict(compilation_config={"cudagraph_capture_sizes": [1, 4, 8]}),
                                     dict(compilation_config={"cudagraph_capture_sizes": [1, 4, 8],
                                                              "max_cudagraph_capture_size": 8})])
def test_capture_sizes_from_any_of_their_names(options):
    assert sizes(**options) == [1, 4, 8]


@pytest.mark.parametrize("options", [dict(enforce_eager=True, cudagraph_capture_sizes=[1, 2]),
                                     dict(compilation_config={"cudagraph_mode": "NONE"}),
                                     dict(compilation_config={"cudagraph_mode": "none", "mode": 3}),
                                     dict(compilation_config={"cudagraph_mode": 0}),
                                     dict(optimization_level=0)])
def test_graphs_off(options):
    assert sizes(**options) == []


@pytest.mark.parametrize("options", [dict(compilation_config=0), dict(compilation_config=3),
                                     dict(compilation_config={"mode": "VLLM_COMPILE"}),
                                     dict(compilation_config={"level": 3}),
                                     dict(compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}),
                                     dict(compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}),
                                     dict(compilation_config={"cudagraph_mode": "PIECEWISE"}, optimization_level=3),
                                     dict(optimization_level=0, compilation_config={"cudagraph_mode": "FULL"}),
                                     dict(optimization_level=2)])
def test_every_other_mode_captures_decode_steps(options):
    assert sizes(**options) == default_graph_sizes(64)


def test_torch_compile_fields_are_taken_and_said_to_do_nothing_once(caplog):
    config = {"pass_config": {"fuse_norm_quant": True}, "backend": "inductor", "cudagraph_capture_sizes": [2]}
    with caplog.at_level(logging.WARNING, logger="shardserve.compilation"):
        assert sizes(compilation_config=config) == sizes(compilation_config=config) == [2]
    assert caplog.text.count("backend, pass_config: torch.compile options, which shardserve does not use") == 1


@pytest.mark.parametrize("options, message", [
    (dict(compilation_config={"cudagraph_sizes": [1]}), "compilation_config has no field cudagraph_sizes"),
    (dict(compilation_config=5), "compilation_config.mode must be one of NONE, STOCK_TORCH_COMPILE"),
    (dict(compilation_config={"cudagraph_mode": "HALF"}), "cudagraph_mode must be one of NONE, PIECEWISE"),
    (dict(compilation_config="3"), "compilation_config must be an int"),
    (dict(compilation_config={"mode": 3, "level": 3}), "compilation_config.mode and compilation_config.level are "
                                                         "mutually exclusive"),
    (dict(cudagraph_capture_sizes=[1], compilation_config={"cudagraph_capture_sizes": [2]}),
     "cudagraph_capture_sizes and compilation_config.cudagraph_capture_sizes are mutually exclusive"),
    (dict(cudagraph_capture_sizes=[1], cuda_graph_sizes=[1]), "mutually exclusive"),
    (dict(max_cudagraph_capture_size=4, compilation_config={"max_cudagraph_capture_size": 4}), "mutually exclusive"),
    (dict(cudagraph_capture_sizes=[1, 0]), "cudagraph_capture_sizes must be a list of positive integers"),
    (dict(cudagraph_capture_sizes=[]), "cudagraph_capture_sizes must be a list of positive integers"),
    (dict(cudagraph_capture_sizes=[1, 4], max_cudagraph_capture_size=8), r"max_cudagraph_capture_size \(8\) must be "
                                                                         r"the largest of cudagraph_capture_sizes"),
    (dict(max_cudagraph_capture_size=-1), "max_cudagraph_capture_size must be a non-negative integer"),
    (dict(optimization_level=4), "optimization_level must be 0, 1, 2 or 3"),
])
def test_what_vllm_refuses_is_refused_with_its_reason(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **options)


def test_llm_takes_vllm_compilation_options(model_dirs):
    """A vLLM script's options reach the engine (its decode graphs where there is a GPU; the same tokens)."""
    prompt = [TokensPrompt(prompt_token_ids=[5, 9, 23, 40])]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLM(model_dirs("llama"), dtype="float32").generate(prompt, params, use_tqdm=False)
    llm = LLM(model_dirs("llama"), dtype="float32", optimization_level=3,
              compilation_config={"mode": 3, "cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": [1, 2],
                                  "pass_config": {"fuse_norm_quant": False}})
    assert llm.llm_engine.config.cuda_graph_batch_sizes() == [1, 2]
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_serve_takes_vllms_compilation_flags(monkeypatch):
    def config(*flags):
        return model_specs(build_parser().parse_args(["serve", "a", *flags]))[0].engine_config()
    assert config("-cc", '{"cudagraph_capture_sizes": [1, 4]}').cuda_graph_batch_sizes() == [1, 4]
    assert config("--compilation-config", "3", "--max-cudagraph-capture-size", "8").cuda_graph_batch_sizes() == \
        [1, 2, 4, 8]
    assert config("--cudagraph-capture-sizes", "2", "1").cuda_graph_batch_sizes() == [1, 2]
    assert config("-O0").cuda_graph_batch_sizes() == config("-O", "0").cuda_graph_batch_sizes() == []
    assert config("-O3").cuda_graph_batch_sizes() == default_graph_sizes(256)
    assert config("-cc", '{"cudagraph_mode": "NONE"}').cuda_graph_batch_sizes() == []
    monkeypatch.setattr("shardserve.cluster.ray_cluster.connect", lambda address: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit, match="shardserve serve: error: compilation_config has no field x"):
        main(["serve", "a", "-cc", '{"x": 1}'])
    with pytest.raises(SystemExit):  # argparse's own: not 0-3
        main(["serve", "a", "-O4"])
