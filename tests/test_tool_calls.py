"""Reading tool calls out of chat answers: the hermes parser (vLLM's --tool-call-parser hermes), whole and
streamed."""
from __future__ import annotations

import json

import pytest

from shardserve.router.tool_calls import ChatAnswers, HermesToolParser, Llama3JsonToolParser, PythonicToolParser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "UTC", "note": "caf\u00e9"}}'


def _streamed(parser, text: str, step: int) -> tuple[str, list[tuple[int, dict]]]:
    """`text` streamed through the parser `step` characters at a time: the content sent, and each call sent with
    the length of the answer when it was."""
    stream, streamed, sent = parser.stream(), "", []
    for end in list(range(step, len(text), step)) + [len(text)]:
        piece, new = stream.advance(text[:end], finished=end == len(text))
        streamed += piece
        sent += [(end, call) for call in new]
    return streamed, sent


@pytest.mark.parametrize("text,content,calls", [
    ("Just text.", "Just text.", []),
    (f"Checking.<tool_call>\n{WEATHER}\n</tool_call>", "Checking.", [WEATHER]),
    (f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{TIME}</tool_call>", None, [WEATHER, TIME]),
    (f"<tool_call>{WEATHER}</tool_call><tool_call>{TIME}", None, [WEATHER, TIME]),  # the last one cut short
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),   # unreadable: all content
    ('<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),  # no arguments
    ("a < b, and <tool", "a < b, and <tool", []),
])
def test_hermes_answers_whole_and_streamed(text, content, calls):
    """The whole answer as vLLM's hermes parser reads it (arguments as JSON text, non-ASCII kept); and the same
    answer streamed in pieces of every size: the content and calls of the deltas add up to the whole answer's,
    no content is sent that turns out to be a tag, each call's header is sent once, and its arguments stream as
    the model writes them."""
    parser = HermesToolParser()
    got_content, got_calls = parser.parse(text)
    expected = [json.loads(c) for c in calls]
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == \
        [(c["name"], c["arguments"]) for c in expected]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in got_calls)
    if TIME in calls:  # as vLLM: arguments written with ensure_ascii=False
        assert '"café"' in got_calls[-1]["function"]["arguments"]
    for step in range(1, 8):
        streamed, sent = _streamed(parser, text, step)
        assert streamed == (content or "")
        calls_sent = _joined(sent)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls_sent] == \
            [(c["name"], c["arguments"]) for c in expected]
        if calls and step == 1:  # a call's arguments stream as they are written, before the call is whole
            first_arguments_at = next(end for end, d in sent if d["index"] == 0 and "arguments" in d["function"])
            assert first_arguments_at < text.index(calls[0]) + len(calls[0]) - 1
            assert len([d for _, d in sent if d["index"] == 0]) > 2


def _joined(sent: list[tuple[int, dict]]) -> list[dict]:
    """Streamed call deltas put together as clients do: by index, the header's id and name, the arguments
    joined."""
    calls: dict[int, dict] = {}
    for _, delta in sent:
        if "id" in delta:
            assert delta["index"] not in calls and delta["type"] == "function"  # each call's header once
            calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
        calls[delta["index"]]["arguments"] += delta["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


LLAMA_WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.mark.parametrize("text,content,calls", [
    ("Just text.", "Just text.", []),
    (LLAMA_WEATHER, None, [WEATHER]),
    (f"<|python_tag|>{LLAMA_WEATHER}; {TIME}", None, [WEATHER, TIME]),   # "arguments" is read too
    (f" {LLAMA_WEATHER}", None, [WEATHER]),
    ('{"name": "f"}', '{"name": "f"}', []),                 # an object that is no call: all content
    ("{not json", "{not json", []),
    ("<|python", "<|python", []),
])
def test_llama3_json_answers_whole_and_streamed(text, content, calls):
    """vLLM's llama3_json: calls are the whole answer (content None), each object {"name", "parameters"}; an
    answer with an object that is not a call is content. Streamed in pieces of every size, the answer's first
    characters decide: a call is sent whole at the end, anything else as content as it comes."""
    parser = Llama3JsonToolParser()
    got_content, got_calls = parser.parse(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == \
        [(json.loads(c)["name"], json.loads(c)["arguments"]) for c in calls]
    for step in range(1, 8):
        streamed, sent = _streamed(parser, text, step)
        assert all(end == len(text) for end, _ in sent)  # calls only once the answer is whole
        assert streamed == (content or "") and [c["function"] for _, c in sent] == [c["function"] for c in got_calls]
    # vLLM's rule: text before a call, whole, drops the text; streamed, an answer that starts as text stays text
    assert parser.parse(f"Sure: {LLAMA_WEATHER}")[0] is None
    stream = parser.stream()
    assert stream.advance("Sure: ", False) == ("Sure: ", [])
    assert stream.advance(f"Sure: {LLAMA_WEATHER}", True) == (LLAMA_WEATHER, [])


@pytest.mark.parametrize("text,content,calls", [
    ("Just text.", "Just text.", []),
    ('[get_weather(city="Paris")]', None, [("get_weather", {"city": "Paris"})]),
    ("[get_weather(city='Paris'), get_time(zone=\"UTC\", note='caf\u00e9')]", None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC", "note": "caf\u00e9"})]),
    ('[f(a=null, b=true, c=-1.5, d=(1, 2), e={"k": [1, {"x": False}]}, g=f"x")]', None,
     [("f", {"a": None, "b": True, "c": -1.5, "d": [1, 2], "e": {"k": [1, {"x": False}]}, "g": "x"})]),
    ("[f(x=os.system('ls'))]", "[f(x=os.system('ls'))]", []),   # read, never run: only literals are arguments
    ("[f(1)]", "[f(1)]", []), ("[a.b(x=1)]", "[a.b(x=1)]", []), ("[ f(x=1)]", "[ f(x=1)]", []),
    ("Sure: [f(x=1)]", "Sure: [f(x=1)]", []), ("[f(x=1)", "[f(x=1)", []), ("[" * 5000, "[" * 5000, []),
    ('<|python_start|>[f(x=1)]<|python_end|>', None, [("f", {"x": 1})]),   # Llama 4's wrapping
])
def test_pythonic_answers_whole_and_streamed(text, content, calls):
    """vLLM's pythonic / llama4_pythonic: the answer is a Python list of calls with literal keyword arguments,
    read with Python's parser (nothing runs); anything else is content. Streamed, an answer that opens with "["
    (or Llama 4's tag) is read when it ends."""
    parser = PythonicToolParser(llama4=True)
    got_content, got_calls = parser.parse(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    for step in (1, 3, 7):
        streamed, sent = _streamed(parser, text, step)
        assert all(end == len(text) for end, _ in sent)
        assert streamed == (content or "") and [c["function"] for _, c in sent] == [c["function"] for c in got_calls]
    assert PythonicToolParser().parse('<|python_start|>[f(x=1)]')[1] == []  # plain pythonic: no Llama 4 tag


def test_answers_by_tool_choice():
    """How each tool_choice turns an answer into a message and a finish reason (OpenAI's rules, as vLLM)."""
    text = f"<tool_call>{WEATHER}</tool_call>"
    plain = ChatAnswers(None, None)
    assert plain.plain and plain.message(text) == ({"role": "assistant", "content": text}, False)
    auto = ChatAnswers("auto", HermesToolParser())
    message, called = auto.message(text)
    assert called and message["content"] is None and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert auto.finish_reason("stop", True) == "tool_calls" and auto.finish_reason("length", False) == "length"
    named = ChatAnswers({"type": "function", "function": {"name": "get_weather"}}, None)
    message, called = named.message('{"city": "Paris"}')
    assert message["content"] == "" and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert named.finish_reason("stop", called) == "stop"
    required = ChatAnswers("required", None)
    message, called = required.message(f"[{json.dumps({'name': 'f', 'parameters': {'x': 1}})}]")
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert required.finish_reason("stop", called) == "tool_calls"
    assert required.message("[{") == ({"role": "assistant", "content": ""}, False)  # cut short: no calls


def test_answers_of_a_reasoning_model():
    """With a reasoning parser, the thinking is the message's `reasoning` and the calls are read from the rest; a
    named call's stream starts (its id and name) with the first token of the answer, after the thinking."""
    from conftest import build_tokenizer

    from shardserve.engine.reasoning import reasoning_parser_for
    reasoning = reasoning_parser_for("deepseek_r1", build_tokenizer("thinking"))
    auto = ChatAnswers("auto", HermesToolParser(), reasoning)
    message, called = auto.message(f"<think>plan</think>Sure.<tool_call>{WEATHER}</tool_call>")
    assert called and (message["reasoning"], message["content"]) == ("plan", "Sure.")
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    hidden = ChatAnswers(None, None, reasoning, include_reasoning=False)
    assert not hidden.plain and hidden.message("plan</think>Paris")[0] == \
        {"role": "assistant", "content": "Paris", "reasoning": None}
    named = ChatAnswers({"type": "function", "function": {"name": "get_weather"}}, None, reasoning)
    text, deltas = "", []
    for piece in ["pl", "an</think>", '{"city"', ': "Paris"}']:
        text += piece
        deltas.append(named.delta(0, text, piece, len(deltas) == 0, False)[0])
    assert deltas[0] == {"reasoning": "pl"} and deltas[1] == {"reasoning": "an"}
    (head,) = deltas[2]["tool_calls"]
    assert head["function"] == {"name": "get_weather", "arguments": '{"city"'} and head["id"]
    assert deltas[3] == {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}
