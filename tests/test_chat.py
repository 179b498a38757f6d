"""LLM.chat renders conversations with a chat template exactly as transformers does, then generates."""
from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from shardserve import LLM, SamplingParams, TokensPrompt
from shardserve.entrypoints.chat_utils import load_chat_template, resolve_chat_template

# ChatML-like, with the tokenizer's own BOS and EOS (</s> ends each turn), so a second BOS would show.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
            "{{ eos_token }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A different one, to prove a given template wins over the tokenizer's.
CUSTOM = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}"
          "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "The capital of France is"}]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_path(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def chat_path(plain_path, tmp_path_factory):
    """A copy of the model dir whose tokenizer carries TEMPLATE."""
    path = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(plain_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(chat_path):
    return AutoTokenizer.from_pretrained(chat_path)


@pytest.fixture(scope="module")
def llm(chat_path):
    return LLM(chat_path, dtype="float32")


def hf_ids(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_prompt_ids_equal_transformers_with_the_tokenizer_template(llm, tokenizer):
    out = llm.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert len(out) == 1
    expected = hf_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    assert out[0].prompt_token_ids == expected
    assert expected.count(tokenizer.bos_token_id) == 1 and expected[0] == tokenizer.bos_token_id
    assert out[0].prompt == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert out[0].prompt.endswith("<|im_start|>assistant\n")
    # Encoding the rendered text as a plain prompt would have added a second BOS.
    assert tokenizer.encode(out[0].prompt)[:2] == [tokenizer.bos_token_id] * 2


def test_a_given_template_wins_over_the_tokenizers(llm, tokenizer, chat_path, tmp_path):
    expected = hf_ids(tokenizer, MESSAGES, add_generation_prompt=True, chat_template=CUSTOM)
    assert expected != hf_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    out = llm.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template=CUSTOM)[0]
    assert out.prompt_token_ids == expected
    assert out.prompt.endswith("[ASSISTANT]")

    template_file = tmp_path / "custom.jinja"
    template_file.write_text(CUSTOM)
    from_path = LLM(chat_path, dtype="float32", chat_template=str(template_file))
    assert from_path.chat_template == CUSTOM
    assert from_path.chat(MESSAGES, GREEDY, use_tqdm=False)[0].prompt_token_ids == expected
    # A template passed to chat() still beats the LLM's default.
    assert from_path.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template=TEMPLATE)[0].prompt_token_ids == \
        hf_ids(tokenizer, MESSAGES, add_generation_prompt=True)


def test_add_generation_prompt_false(llm, tokenizer):
    out = llm.chat(MESSAGES, GREEDY, use_tqdm=False, add_generation_prompt=False)[0]
    assert out.prompt_token_ids == hf_ids(tokenizer, MESSAGES, add_generation_prompt=False)
    assert not out.prompt.endswith("assistant\n")


def test_continue_final_message_leaves_the_assistant_turn_open(llm, tokenizer):
    partial = "Sure, the answer is"
    messages = MESSAGES + [{"role": "assistant", "content": partial}]
    out = llm.chat(messages, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith(partial)
    assert out.prompt_token_ids == hf_ids(tokenizer, messages, continue_final_message=True)
    assert out.prompt_token_ids[-1] != tokenizer.eos_token_id
    # Closed, the same conversation ends with the end-of-turn marker instead.
    closed = llm.chat(messages, GREEDY, use_tqdm=False, add_generation_prompt=False)[0]
    assert closed.prompt.endswith(partial + tokenizer.eos_token + "\n")


def test_continue_final_message_errors(llm):
    messages = MESSAGES + [{"role": "assistant", "content": "Sure"}]
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(messages, GREEDY, use_tqdm=False, continue_final_message=True)  # generation prompt left on
    with pytest.raises(ValueError, match="assistant"):
        llm.chat(MESSAGES, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_outputs_equal_generate_on_the_rendered_ids(llm):
    chat = llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0]
    gen = llm.generate([TokensPrompt(prompt_token_ids=chat.prompt_token_ids)], GREEDY, use_tqdm=False)[0]
    assert len(chat.outputs[0].token_ids) == 8
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
    assert chat.outputs[0].text == gen.outputs[0].text


def test_list_of_text_parts_content(llm, tokenizer):
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "The capital"},
                                                       {"type": "text", "text": "of France is"}]}]
    joined = [MESSAGES[0], {"role": "user", "content": "The capital\nof France is"}]
    out = llm.chat(parts, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == hf_ids(tokenizer, joined, add_generation_prompt=True)
    assert out.outputs[0].token_ids == llm.chat(joined, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="only text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 GREEDY, use_tqdm=False)


def test_chat_template_content_format(llm, tokenizer):
    """vLLM's chat_template_content_format: "openai" hands a template that prints a message's content the list
    of parts, "string" (and "auto" for such a template) the parts joined; anything else is refused."""
    printing = "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}"
    messages = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]}]

    def prompt(content_format: str) -> str:
        return llm.chat(messages, GREEDY.clone(max_tokens=1), use_tqdm=False, chat_template=printing,
                        add_generation_prompt=False, chat_template_content_format=content_format)[0].prompt
    assert prompt("string") == prompt("auto") == "user=a b\nc;"
    assert prompt("openai") == "user=[{'type': 'text', 'text': 'a b'}, {'type': 'text', 'text': 'c'}];"
    with pytest.raises(ValueError, match="chat_template_content_format must be one of auto, string, openai"):
        prompt("parts")


def test_a_template_that_reads_parts_gets_the_parts(llm, tokenizer):
    parts_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{% for p in m['content'] %}"
                      "<{{ p['text'] }}>{% endfor %}{{ eos_token }}{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=parts_template,
                   add_generation_prompt=False)[0]
    assert out.prompt == f"{tokenizer.bos_token}user:<a b><c>{tokenizer.eos_token}"


def test_a_batch_of_conversations_in_order(llm, tokenizer):
    other = [{"role": "user", "content": "Hello, world!"},
             {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Numbers 0 1 2 3"}]
    outs = llm.chat([MESSAGES, other], GREEDY, use_tqdm=False)
    assert len(outs) == 2
    for out, messages in zip(outs, [MESSAGES, other]):
        assert out.prompt_token_ids == hf_ids(tokenizer, messages, add_generation_prompt=True)
        alone = llm.chat(messages, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    # One SamplingParams per conversation also works.
    outs = llm.chat([MESSAGES, other], [GREEDY, GREEDY.clone(max_tokens=3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 3]


def test_chat_template_kwargs_and_tools_reach_the_template(llm):
    template = ("{{ bos_token }}{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
                "{% endif %}{% if greeting is defined %}{{ greeting }}{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    out = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, chat_template=template,
                   tools=tools, chat_template_kwargs={"greeting": "Hello "})[0]
    assert out.prompt == "<s>TOOLS:get_weather;Hello hi"
    with pytest.raises(ValueError, match="tokenize"):
        llm.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template_kwargs={"tokenize": True})


def test_no_template_anywhere_is_a_clear_error(plain_path):
    llm = LLM(plain_path, dtype="float32")
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    # ... and passing one is enough.
    assert llm.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template=TEMPLATE)[0].prompt.startswith("<s>")


def test_bad_messages(llm):
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat([], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError):
        llm.chat("just a string", GREEDY, use_tqdm=False)


def test_load_chat_template(tmp_path):
    assert load_chat_template(None) is None
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(path) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match="missing.jinja"):
        LLM("unused-model-dir", chat_template=str(tmp_path / "missing.jinja"))


def test_resolve_chat_template(tokenizer):
    assert resolve_chat_template(tokenizer) == TEMPLATE
    assert resolve_chat_template(tokenizer, CUSTOM) == CUSTOM

    class Bare:
        chat_template = None
    with pytest.raises(ValueError, match=r"chat_template=.*LLM\(chat_template=\.\.\.\)"):
        resolve_chat_template(Bare())
