"""Our models against transformers on tiny random-weight checkpoints: same prefill logits."""
from __future__ import annotations

import pytest
import torch
import transformers

from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.attention.backend import PrefillSeq
from shardserve.models.source import build_model, load_model_source

VOCAB = 300
GPT2_SMALL = dict(n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
SMALL = dict(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB)
LLAMA_SMALL = dict(SMALL, num_hidden_layers=2, intermediate_size=128, num_key_value_heads=2,
                   max_position_embeddings=128)

CASES = {
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM,
            dict(SMALL, num_hidden_layers=2, ffn_dim=128, max_position_embeddings=64)),
    "opt-post-norm-projected": (transformers.OPTConfig, transformers.OPTForCausalLM,
                                dict(SMALL, num_hidden_layers=2, ffn_dim=128, max_position_embeddings=64,
                                     do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt-projected": (transformers.OPTConfig, transformers.OPTForCausalLM,
                      dict(SMALL, num_hidden_layers=2, ffn_dim=128, max_position_embeddings=64,
                           word_embed_proj_dim=32)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(GPT2_SMALL, n_layer=3)),
    "gpt2-inverse-layer-scale": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
                                 dict(GPT2_SMALL, n_layer=2, scale_attn_by_inverse_layer_idx=True, n_inner=96)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, LLAMA_SMALL),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(LLAMA_SMALL, tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, LLAMA_SMALL),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(LLAMA_SMALL, head_dim=32)),
}


def _prefill(model, input_ids: torch.Tensor) -> torch.Tensor:
    T = input_ids.numel()
    positions = torch.arange(T)
    meta = AttentionMetadata(slot_mapping=torch.arange(T), prefills=[PrefillSeq(0, T, 0, torch.arange(T))])
    return model.compute_logits(model(input_ids, positions, meta))


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_transformers(case, tmp_path):
    config_cls, hf_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    hf_model = hf_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():
        for p in hf_model.parameters():  # HF initialises biases to 0 and norms to 1: make them random too
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.save_pretrained(tmp_path)

    source = load_model_source(str(tmp_path))
    model = build_model(source, torch.float32, torch.device("cpu"))

    input_ids = torch.randint(0, VOCAB, (12,))
    with torch.no_grad():
        expected = hf_model(input_ids[None]).logits[0]
        ours = _prefill(model, input_ids)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_gpt2_checkpoint_without_transformer_prefix():
    """Old GPT-2 checkpoints name tensors "h.0.attn.c_attn.weight", not "transformer.h.0...", and carry the
    attention-mask buffers; both must load."""
    from shardserve.models.gpt2 import GPT2LMHeadModel

    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SMALL, n_layer=2)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model = GPT2LMHeadModel(config)
    model.load_weights(state.items())
    input_ids = torch.randint(0, VOCAB, (12,))
    with torch.no_grad():
        torch.testing.assert_close(_prefill(model, input_ids), hf_model(input_ids[None]).logits[0],
                                   atol=1e-4, rtol=1e-4)
