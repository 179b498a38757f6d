"""LoRA adapters (vLLM's enable_lora / LoRARequest): a request through an adapter answers as the base model with
the adapter merged into its weights (W + scaling B A) answers in transformers, while requests of other adapters,
and of none, share its steps."""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_lora_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shardserve import LLM, BeamSearchParams, SamplingParams, TokensPrompt
from shardserve.lora.request import LoRARequest

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 100, 200, 150, 7, 9, 33, 21, 17, 5, 6, 70, 71, 72, 73, 74, 75, 76, 77, 78],
           [1, 300, 301, 302]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def merged_reference(model_dir: str, lora_dir: str | None):
    """The model in transformers with the adapter merged into its weights (the definition of what LoRA computes):
    W + scaling B A for each pair, an expert's into its rows of transformers' stacked experts (gate's above up's)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if lora_dir is None:
        return model
    config = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(Path(lora_dir) / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                delta = scaling * tensors[key.replace("lora_A", "lora_B")] @ a
                expert = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)", name.replace("block_sparse_moe", "mlp"))
                if expert is None:
                    modules[name].weight += delta
                    continue
                experts, e, projection = modules[expert[1]], int(expert[2]), expert[3]
                inter = experts.down_proj.size(-1)
                if projection in ("gate_proj", "w1"):
                    experts.gate_up_proj[e, :inter] += delta
                elif projection in ("up_proj", "w3"):
                    experts.gate_up_proj[e, inter:] += delta
                else:
                    experts.down_proj[e] += delta
    return model


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        # no EOS: the engine's ignore_eos (min_new_tokens would instead forbid the EOS token where it is greedy)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8,
               kv_cache_memory_bytes=1 << 26)


def test_requests_through_adapters_answer_as_merged_weights(llm, model_dir, lora_dirs):
    """One batch: a prompt through adapter "all" (every projection), one through "qv" (q and v only, rank 8,
    rsLoRA), one through none, and the first prompt again through none: each is greedy of its own merged model,
    and the same prompt under an adapter and without shares no prefix-cache blocks (its KV differs). max_loras=1
    (vLLM's rule): one adapter runs at a time, the "qv" request waiting for the "all" one while the base model's
    requests run beside them."""
    all_, qv = lora_dirs("llama", "all"), lora_dirs("llama", "qv")
    loras = [LoRARequest("all", 1, all_), LoRARequest("qv", 2, qv), None, None]
    prompts = PROMPTS + PROMPTS[:1]
    scheduler, steps = llm.llm_engine.scheduler, []
    schedule = scheduler.schedule

    def recorded():
        out = schedule()
        steps.append(({r.lora_request.lora_int_id for r in scheduler.running if r.lora_request},
                      len(scheduler.running)))
        return out
    scheduler.schedule = recorded
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], GREEDY, use_tqdm=False,
                            lora_request=loras)
    finally:
        del scheduler.schedule
    assert steps[0] == ({1}, 3) and max(len(adapters) for adapters, _ in steps) == 1 and ({2}, 1) in steps
    references = {path: merged_reference(model_dir, path) for path in (all_, qv, None)}
    for prompt, lora, out in zip(prompts, loras, outs):
        expected = hf_greedy(references[lora and lora.lora_path], prompt, 12)
        assert list(out.outputs[0].token_ids) == expected, lora
    assert outs[0].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the adapter changed the answer
    # later, alone: the base model's blocks of PROMPTS[0] are cached, and the adapter's request does not use them
    again = llm.generate(TokensPrompt(prompt_token_ids=PROMPTS[0]), GREEDY, use_tqdm=False, lora_request=loras[0])
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, lora_request=loras[1],
                    chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expected = hf_greedy(references[qv], list(chat[0].prompt_token_ids), 12)
    assert list(chat[0].outputs[0].token_ids) == expected


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_other_families_through_adapters_answer_as_merged_weights(arch, model_dirs, lora_dirs):
    """Gemma's layers carry the same projections; a mixture of experts' adapter "all" changes its attention, its
    dense MLPs (Qwen3-MoE's dense layer, Qwen2-MoE's shared expert and its gate), its routers and every expert's
    projections (a pair per expert, as PEFT saved them from transformers 4): adapters, beside a request of none,
    in one batch."""
    model_dir = model_dirs(arch)
    llm = LLM(model_dir, dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes=1 << 26)
    loras = [LoRARequest("all", 1, lora_dirs(arch, "all")), LoRARequest("qv", 2, lora_dirs(arch, "qv")), None]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY, use_tqdm=False,
                        lora_request=loras)
    for prompt, lora, out in zip(PROMPTS, loras, outs):
        expected = hf_greedy(merged_reference(model_dir, lora and lora.lora_path), prompt, 12)
        assert list(out.outputs[0].token_ids) == expected, lora
    assert outs[0].outputs[0].token_ids != hf_greedy(merged_reference(model_dir, None), PROMPTS[0], 12)
    llm.shutdown()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_peft_stacked_experts_adapters_answer_as_peft(arch, model_dirs, lora_dirs):
    """PEFT on transformers 5's stacked experts (`target_parameters`): one pair per stacked parameter with every
    expert's rows in it, and every linear layer (Qwen2-MoE's shared expert and its gate); for Mixtral PEFT also
    adapts the router and gives gate_up_proj twice the rank (`rank_pattern`, `alpha_pattern`). The engine
    answers as PEFT's model under the adapter does, beside a request of none. (Every GEMM path and dtype of the
    experts' adapters: test_moe.py.)"""
    from peft import PeftModel
    model_dir, adapter = model_dirs(arch), lora_dirs(arch, "stacked")
    saved = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    assert any(key.endswith("experts.base_layer.lora_A.weight") for key in saved)
    if arch == "mixtral":
        assert json.loads((Path(adapter) / "adapter_config.json").read_text())["rank_pattern"]
        assert any(key.endswith("mlp.gate.lora_A.weight") for key in saved)
    reference = PeftModel.from_pretrained(merged_reference(model_dir, None), adapter).eval()
    llm = LLM(model_dir, dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes=1 << 26)
    loras = [LoRARequest("stacked", 1, adapter), None, LoRARequest("stacked", 1, adapter)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY, use_tqdm=False,
                        lora_request=loras)
    for prompt, lora, out in zip(PROMPTS, loras, outs):
        with reference.disable_adapter() if lora is None else contextlib.nullcontext():
            assert list(out.outputs[0].token_ids) == hf_greedy(reference, prompt, 12), lora
    with reference.disable_adapter():
        assert outs[0].outputs[0].token_ids != hf_greedy(reference, PROMPTS[0], 12)
    llm.shutdown()


def test_beam_search_through_adapters_matches_transformers_on_merged_weights(llm, model_dir, lora_dirs):
    """LLM.beam_search(lora_request=[...]): each prompt's beams run through its own adapter (or none) in one
    search, and are those of transformers' beam search on that adapter's merged model."""
    all_, qv = lora_dirs("llama", "all"), lora_dirs("llama", "qv")
    loras = [LoRARequest("all", 1, all_), None, LoRARequest("qv", 2, qv)]
    width, steps = 3, 8
    outs = llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                           BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True), lora_request=loras)
    for prompt, lora, out in zip(PROMPTS, loras, outs):
        reference = merged_reference(model_dir, lora and lora.lora_path)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), do_sample=False, num_beams=width,
                                          num_return_sequences=width, max_new_tokens=steps, min_new_tokens=steps,
                                          pad_token_id=0, early_stopping=True)
        assert [s.tokens for s in out.sequences] == expected.tolist(), lora
    plain = llm.beam_search(TokensPrompt(prompt_token_ids=PROMPTS[0]),
                            BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    assert plain[0].sequences[0].tokens != outs[0].sequences[0].tokens  # the adapter changed the beams
    with pytest.raises(ValueError, match="Got 2 LoRA requests for 3 prompts"):
        llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], BeamSearchParams(2, 2), [None, None])


def test_max_cpu_loras_keeps_more_adapters_loaded_than_run_at_once(model_dir, lora_dirs, tmp_path):
    """vLLM's max_cpu_loras: one adapter runs at a time (max_loras=1) while the worker keeps two loaded, the least
    recently used dropped for a third; answers stay each adapter's. Fewer than max_loras is refused."""
    adapters = [LoRARequest("all", 1, lora_dirs("llama", "all")), LoRARequest("qv", 2, lora_dirs("llama", "qv")),
                LoRARequest("third", 3, make_lora_dir(tmp_path / "third", model_dir, seed=7))]
    llm = LLM(model_dir, dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8,
              kv_cache_memory_bytes=1 << 26)
    cache = llm.llm_engine.executor.worker.runner.adapters
    prompt = TokensPrompt(prompt_token_ids=PROMPTS[0])
    answers = {}
    for lora, loaded in [(0, [1]), (1, [1, 2]), (0, [2, 1]), (2, [1, 3]), (0, [3, 1])]:
        answer = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=adapters[lora])[0].outputs[0].token_ids
        assert answers.setdefault(lora, answer) == answer
        assert list(cache.loaded) == loaded  # least recently used first
    assert answers[0] == hf_greedy(merged_reference(model_dir, adapters[0].lora_path), PROMPTS[0], 12)
    llm.shutdown()
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be an integer of at least max_loras \(2\)"):
        LLM(model_dir, enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_bad_adapters_are_refused_before_anything_runs(llm, model_dir, model_dirs, lora_dirs, tmp_path):
    """Refused at the request, in words, before a worker could fail on it: the engine serves on."""
    all_ = lora_dirs("llama", "all")
    prompt = TokensPrompt(prompt_token_ids=PROMPTS[0])
    cases = [(LoRARequest("big", 3, make_lora_dir(tmp_path / "big", model_dir, rank=16)), "greater than max_lora_rank"),
             (LoRARequest("qwen3's", 6, lora_dirs("qwen3")), "an adapter of another model"),
             (LoRARequest("nothing", 4, str(tmp_path)), "has no adapter_config.json"),
             (LoRARequest("other", 1, str(tmp_path / "big")), "lora_int_id 1 is already the adapter"),
             (LoRARequest("embed", 5, make_lora_dir(tmp_path / "embed", model_dir, targets=("q_proj",),
                                                    modules_to_save=["lm_head"])), "modules_to_save")]
    llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("all", 1, all_))  # id 1 is "all" now
    for lora, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)
    served = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("all", 1, all_))
    assert served[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="Got 2 LoRA requests for 1 prompts"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=[None, None])
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("zero", 0, all_)
    plain = LLM(model_dir, dtype="float32", kv_cache_memory_bytes=1 << 24)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("all", 1, all_))
    plain.shutdown()
    opt = LLM(model_dirs("opt"), dtype="float32", enable_lora=True, kv_cache_memory_bytes=1 << 24)
    with pytest.raises(ValueError, match="LoRA adapters run on .*LlamaForCausalLM"):
        opt.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("all", 1, all_))
    opt.shutdown()


def test_bad_adapters_of_a_mixture_of_experts_are_refused_in_words(model_dirs, tmp_path):
    """An adapter of an expert the model does not have, or a stacked experts' pair of another expert count, is
    refused at the request, naming it; the engine serves on."""
    from safetensors.torch import save_file
    model_dir = model_dirs("qwen3_moe")  # 8 experts of intermediate size 32; layer 0 is sparse, layer 1 dense
    llm = LLM(model_dir, dtype="float32", enable_lora=True, kv_cache_memory_bytes=1 << 24)
    prompt = TokensPrompt(prompt_token_ids=PROMPTS[0])
    for name, tensors, message in [
            ("no expert 8", {"layers.0.mlp.experts.8.gate_proj": (torch.zeros(4, 64), torch.zeros(32, 4))},
             r"mlp\.experts\.8\.gate_proj, which this model does not have"),
            ("no experts in a dense layer", {"layers.1.mlp.experts.0.gate_proj": (torch.zeros(4, 64),
                                                                                 torch.zeros(32, 4))},
             r"layers\.1\.mlp\.experts\.0\.gate_proj, which this model does not have"),
            ("4 experts' stacked pair", {"layers.0.mlp.experts.base_layer": (torch.zeros(16, 64),
                                                                              torch.zeros(64, 16))},
             r"not a rank-4 pair for a 64 x 64 projection of 8 experts")]:
        adapter = make_lora_dir(tmp_path / name, model_dir, targets=("q_proj",))
        path = Path(adapter) / "adapter_model.safetensors"
        saved = load_file(str(path))
        for module, (a, b) in tensors.items():
            saved |= {f"base_model.model.model.{module}.lora_A.weight": a,
                      f"base_model.model.model.{module}.lora_B.weight": b}
        save_file(saved, str(path))
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest(name, len(name), adapter))
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"
    llm.shutdown()
