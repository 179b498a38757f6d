"""Reasoning models (vLLM's --reasoning-parser): the thinking is told apart from the answer, and structured outputs
hold only the answer. The parsers read answers as vLLM's do (benchmarks/vllm_parity.py compares them on the same
answers); the engine's greedy tokens are transformers' under the same rule."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer
from transformers import AutoModelForCausalLM

from shardserve import LLM, SamplingParams, StructuredOutputsParams, TokensPrompt
from shardserve.engine.reasoning import REASONING_PARSERS, reasoning_parser_for

# (answer, deepseek_r1's (reasoning, content), qwen3's, qwen3's with enable_thinking false): vLLM's readings,
# except where a whole answer must read as its stream does (the text before a late <think> stays thinking; a
# repeated </think> stays in R1's answer, as vLLM's whole-answer R1 keeps it; Qwen3's never has one).
ANSWERS = [
    ("plain answer", ("plain answer", None), ("plain answer", None), (None, "plain answer")),
    ("<think>step</think>answer", ("step", "answer"), ("step", "answer"), (None, "<think>stepanswer")),
    ("step</think>answer", ("step", "answer"), ("step", "answer"), (None, "stepanswer")),
    ("step</think>", ("step", None), ("step", None), (None, "step")),
    ("<think>step", ("step", None), ("step", None), (None, "<think>step")),
    ("a<think>b</think>c", ("ab", "c"), ("ab", "c"), (None, "a<think>bc")),
    ("x</think>y</think>z", ("x", "y</think>z"), ("x", "yz"), (None, "xyz")),
    ("think<tool_call>{}</tool_call>", ("think<tool_call>{}</tool_call>", None), ("think", "<tool_call>{}</tool_call>"),
     (None, "think<tool_call>{}</tool_call>")),
    ("\n\nans</think>\n\nc", ("\n\nans", "\n\nc"), ("\n\nans", "\n\nc"), (None, "\n\nans\n\nc")),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("thinking")


@pytest.mark.parametrize("answer,r1,qwen3,qwen3_off", ANSWERS)
def test_answers_split_into_thinking_and_content_whole_and_streamed(tokenizer, answer, r1, qwen3, qwen3_off):
    parsers = [(reasoning_parser_for("deepseek_r1", tokenizer), r1), (reasoning_parser_for("qwen3", tokenizer), qwen3),
               (reasoning_parser_for("qwen3", tokenizer).for_chat({"enable_thinking": False}), qwen3_off)]
    ids = tokenizer.encode(answer, add_special_tokens=False)
    for parser, expected in parsers:
        assert parser.split(answer) == expected, type(parser).name
        stream, reasoning, content = parser.stream(), "", ""
        for i in range(1, len(ids) + 1):  # token by token, as the server streams
            new_reasoning, new_content = stream.advance(tokenizer.decode(ids[:i]))
            reasoning, content = reasoning + new_reasoning, content + new_content
        assert (reasoning or None, content or None) == expected, type(parser).name


def test_where_thinking_ends(tokenizer):
    """In the prompt: the last tag before the answer decides (vLLM's scan back); Qwen3's scan stops at a chat turn's
    boundary, and without thinking (enable_thinking false) it has always ended. While generating: the token that
    ends it, after which the grammar starts (R1: after </think>; Qwen3: also at <tool_call>, part of the answer)."""
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)
    r1, qwen3 = reasoning_parser_for("deepseek_r1", tokenizer), reasoning_parser_for("qwen3", tokenizer)
    qwen3_off = qwen3.for_chat({"enable_thinking": False})
    for prompt, ended in [("user: hi", False), ("hi<think>", False), ("hi<think>\n\n</think>\n\n", True),
                          ("</think> old turn <think> new", False)]:
        assert r1.is_reasoning_end(ids(prompt)) is ended and qwen3.is_reasoning_end(ids(prompt)) is ended, prompt
        assert qwen3_off.is_reasoning_end(ids(prompt))
    end, call, start = tokenizer.convert_tokens_to_ids(["</think>", "<tool_call>", "<think>"])
    assert (r1.grammar_start(end), r1.grammar_start(call), r1.grammar_start(start)) == (1, None, None)
    assert (qwen3.grammar_start(end), qwen3.grammar_start(call)) == (1, 0)
    assert r1.count_reasoning_tokens(ids("<think>ab c</think>done")) == len(ids("ab c"))
    assert qwen3_off.count_reasoning_tokens(ids("ab</think>c")) == 0
    with pytest.raises(ValueError, match="needs <think> and </think> as tokens"):
        reasoning_parser_for("qwen3", build_tokenizer())
    with pytest.raises(ValueError, match="must be one of"):
        reasoning_parser_for("nope", tokenizer)
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3", "deepseek_v3"}


# the engine: structured outputs after the thinking ---------------------------------------------------------------

REGEX = StructuredOutputsParams(regex="[a-c]{3,8}")


@pytest.fixture(scope="module")
def path(model_dirs):
    return model_dirs("llama", "thinking")


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _reference(hf, tokenizer, prompt: list[int], steps: int, bias: dict[int, float], ended: bool) -> list[int]:
    """Greedy with transformers under vLLM's rule: free while thinking, the regex's mask (xgrammar's own matcher
    replayed over the answer so far) once </think> is in the prompt or has been generated."""
    import xgrammar as xgr
    vocab = hf.config.vocab_size
    grammar = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)).compile_regex(
        REGEX.regex)
    matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=[tokenizer.eos_token_id])
    end = tokenizer.convert_tokens_to_ids("</think>")
    seq, outputs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([seq])).logits[0, -1]
            for token_id, value in bias.items():
                logits[token_id] += value
            if ended:
                bits = xgr.allocate_token_bitmask(1, vocab)
                matcher.fill_next_token_bitmask(bits)
                allowed = ((bits[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()
                logits[~allowed[:vocab]] = float("-inf")
            token = int(logits.argmax())
            outputs.append(token)
            seq.append(token)
            if token == tokenizer.eos_token_id:
                break
            if ended:
                assert matcher.accept_token(token)
            ended = ended or token == end
    return outputs


@pytest.mark.parametrize("enable_in_reasoning", [False, True])
def test_the_grammar_holds_the_answer_not_the_thinking(path, hf, enable_in_reasoning):
    """With --reasoning-parser, a structured request thinks freely and its grammar starts after </think>: where
    the prompt has ended the thinking, from the first token; where the model ends it, after that token; where it
    never does, not at all. (A logit bias makes the random model end its thinking at once.) With
    structured_outputs_config enable_in_reasoning, the grammar holds the thinking too, as vLLM's option."""
    llm = LLM(path, dtype="float32", reasoning_parser="deepseek_r1", max_model_len=256, kv_cache_memory_bytes=1 << 26,
              structured_outputs_config={"enable_in_reasoning": enable_in_reasoning})
    tokenizer = llm.get_tokenizer()
    end = tokenizer.convert_tokens_to_ids("</think>")
    thinking, ended = [1, 40, 41, 42, 43], [1, 40, 41, 42, 43, end]
    cases = [(thinking, {}, enable_in_reasoning), (ended, {}, True), (thinking, {end: 30.0}, enable_in_reasoning)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _, _ in cases],
                        [SamplingParams(temperature=0, max_tokens=16, structured_outputs=REGEX, logit_bias=b)
                         for _, b, _ in cases], use_tqdm=False)
    for (prompt, bias, constrained), out in zip(cases, outs):
        c = out.outputs[0]
        assert list(c.token_ids) == _reference(hf, tokenizer, prompt, 16, bias, constrained), (prompt, bias)
    free, from_prompt, after_end = (o.outputs[0] for o in outs)
    assert from_prompt.finish_reason == "stop"
    if not enable_in_reasoning:
        plain = llm.generate(TokensPrompt(prompt_token_ids=thinking), SamplingParams(temperature=0, max_tokens=16),
                             use_tqdm=False)[0].outputs[0]
        assert free.token_ids == plain.token_ids  # thinking all along: never held
        assert after_end.token_ids[0] == end and after_end.finish_reason == "stop"
        assert after_end.text.startswith("</think>")
    llm.shutdown()


def test_a_reasoning_parser_needs_its_tags_in_the_vocabulary(model_dirs):
    with pytest.raises(ValueError, match="needs <think> and </think> as tokens"):
        LLM(model_dirs("llama"), reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        LLM(model_dirs("llama"), reasoning_parser="granite")


def _budget_reference(hf, prompt: list[int], steps: int, budget: int, start: int, end: int) -> list[int]:
    """Greedy with transformers under vLLM's thinking budget: while thinking is open (a start tag after the
    last end tag, prompt included), once `budget` tokens follow the start tag the next token is the end tag."""
    seq, outputs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            opened = max((i for i, t in enumerate(seq) if t == start), default=-1)
            closed = max((i for i, t in enumerate(seq) if t == end), default=-1)
            if opened > closed and len(seq) - (opened + 1) >= budget:
                token = end
            else:
                token = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
            outputs.append(token)
            seq.append(token)
    return outputs


def test_thinking_token_budget_forces_the_end_of_thinking(path, hf):
    """vLLM's thinking_token_budget: thinking opened in the prompt (or the output) may run that many tokens, then
    </think> is forced and the model answers freely; 0 ends it at once; a prompt that never opens thinking is not
    touched; it needs a reasoning parser, and -1 is no limit."""
    llm = LLM(path, dtype="float32", reasoning_parser="deepseek_r1", max_model_len=256, kv_cache_memory_bytes=1 << 26)
    start, end = llm.get_tokenizer().convert_tokens_to_ids(["<think>", "</think>"])
    cases = [([1, 40, 41, start], 3), ([1, 40, start, 42, 43], 4), ([1, 40, 41, start], 0), ([1, 40, 41, 42], 2)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in cases],
                        [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, thinking_token_budget=b)
                         for _, b in cases], use_tqdm=False)
    for (prompt, budget), out in zip(cases, outs):
        assert list(out.outputs[0].token_ids) == _budget_reference(hf, prompt, 10, budget, start, end), prompt
    assert outs[0].outputs[0].token_ids[3] == end and outs[1].outputs[0].token_ids[2] == end
    assert outs[2].outputs[0].token_ids[0] == end
    free = llm.generate([TokensPrompt(prompt_token_ids=cases[0][0])],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, thinking_token_budget=-1),
                        use_tqdm=False)[0].outputs[0]
    assert list(free.token_ids) == _budget_reference(hf, cases[0][0], 10, 10**6, start, end)
    with pytest.raises(ValueError, match="non-negative integer or -1"):
        SamplingParams(thinking_token_budget=-2)
    plain = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26)
    with pytest.raises(ValueError, match="no reasoning parser is configured"):
        plain.generate("x", SamplingParams(thinking_token_budget=4), use_tqdm=False)
