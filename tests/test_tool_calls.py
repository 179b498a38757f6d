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
    # vLLM's rule differs in its stream: there calls are "tool_calls" only where the answer ended normally
    assert auto.finish_reason("length", True) == "tool_calls"
    assert auto.finish_reason("length", True, streamed=True) == "length"
    named = ChatAnswers({"type": "function", "function": {"name": "get_weather"}}, None)
    message, called = named.message('{"city": "Paris"}')
    assert message["content"] == "" and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert named.finish_reason("stop", called) == "stop"
    required = ChatAnswers("required", None)
    message, called = required.message(f"[{json.dumps({'name': 'f', 'parameters': {'x': 1}})}]")
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert required.finish_reason("stop", called) == "tool_calls"
    assert required.message("[{") == ({"role": "assistant", "content": ""}, False)  # cut short: no calls
    assert required.finish_reason("stop", False) == "tool_calls"
    assert required.finish_reason("stop", False, streamed=True) == "stop"


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


# strict tool calling: forced (and strict) calls held to the model's own format -------------------------------

CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
STRICT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}},
                {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
LOOSE_TOOLS = [{"type": "function", "function": t["function"] | {"strict": None}} for t in STRICT_TOOLS]


def _hermes(name: str, arguments: dict, newlines: bool = True) -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>" if newlines else f"<tool_call>{body}</tool_call>"


PARIS, OSLO, LLAMA_PARIS = (_hermes("get_weather", {"city": "Paris"}), _hermes("get_weather", {"city": "Oslo"}),
                            json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}}))
NOW = _hermes("get_time", {"any": [1, "json"]}, newlines=False)
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("model,tools,choice,parallel,level,structured,accepted,refused", [
    # "required": one call or more of the given tools, in either of hermes' layouts; a strict tool's arguments
    # follow its schema, another's are any JSON; nothing else
    ("hermes", STRICT_TOOLS, "required", None, "auto", None, [PARIS, PARIS + NOW],
     ["Paris", OSLO, _hermes("get_date", {}), PARIS + " done"]),
    ("hermes", STRICT_TOOLS, "required", False, "auto", None, [PARIS], [PARIS + NOW]),   # one call at most
    ("hermes", STRICT_TOOLS, NAMED_TIME, None, "auto", None, [NOW], [PARIS, NOW + NOW]),  # that tool, once
    # auto: free text, and once a call opens, a call of the given tools
    ("hermes", STRICT_TOOLS, "auto", None, "auto", None, ["Sunny.", "Let me see." + PARIS, ""],
     ["Let me see." + OSLO]),
    ("hermes", LOOSE_TOOLS, "auto", None, "function", None, ["Sunny.", _hermes("get_weather", {"city": 1})],
     [_hermes("get_date", {})]),
    ("hermes", LOOSE_TOOLS, "auto", None, "parameter", None, [PARIS], [_hermes("get_weather", {"city": 1})]),
    ("hermes", LOOSE_TOOLS, "auto", False, "auto", None, ["Sunny.", PARIS], [PARIS + PARIS]),
    # auto with a constraint of its own: a call, or an answer that keeps to that constraint
    ("hermes", STRICT_TOOLS, "auto", None, "auto", {"json": CITY}, [PARIS, '{"city": "Rome"}'],
     ["Sunny.", '{"city": "Oslo"}']),
    ("hermes", STRICT_TOOLS, "auto", None, "auto", {"regex": "(sun|rain)"}, ["sun", PARIS], ["snow"]),
    # Llama 3's JSON calls (xgrammar's own tag)
    ("llama", STRICT_TOOLS, "required", None, "auto", None, [LLAMA_PARIS], [LLAMA_PARIS.replace("Paris", "Oslo")]),
])
def test_strict_tool_call_tags(model, tools, choice, parallel, level, structured, accepted, refused):
    """vLLM's strict tool calling (tool_tags.py): what the structural tag of each tool choice lets the model write,
    read character by character by xgrammar."""
    import xgrammar as xgr

    from shardserve.router.tool_tags import ToolStrictLevel, tool_call_tag
    from shardserve.sampling_params import StructuredOutputsParams
    tag = tool_call_tag(model, tools, choice, parallel, ToolStrictLevel.from_name(level),
                        structured and StructuredOutputsParams(**structured))
    vocab = [chr(c) for c in range(32, 127)] + ["\n", "</s>"]
    grammar = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])).compile_structural_tag(tag)

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return matcher.accept_string(text) and matcher.accept_token(len(vocab) - 1)
    assert [t for t in accepted if not accepts(t)] == []
    assert [t for t in refused if accepts(t)] == []


def test_no_strict_tag_where_auto_has_no_strict_tool():
    """auto at the auto level without a strict tool: the answer is free (no tag), as vLLM; a constraint of the
    request's own then applies alone."""
    from shardserve.router.tool_tags import ToolStrictLevel, tool_call_tag
    assert tool_call_tag("hermes", LOOSE_TOOLS, "auto", None, ToolStrictLevel.AUTO, None) is None
    with pytest.raises(ValueError, match="tool_strict_level must be one of"):
        ToolStrictLevel.from_name("loose")


def test_forced_answers_read_by_the_parser():
    """Under strict tool calling a forced choice's answer is in the parser's format and read as auto's: a named
    call's content is "" and its finish reason "stop"; "required" ends with "tool_calls"; streamed alike."""
    hermes = HermesToolParser()
    named = ChatAnswers({"type": "function", "function": {"name": "get_weather"}}, hermes, parser_reads_forced=True)
    message, called = named.message(PARIS)
    assert called and message["content"] == "" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == \
        {"city": "Paris"}
    assert named.finish_reason("stop", called) == "stop"
    required = ChatAnswers("required", hermes, parser_reads_forced=True)
    message, called = required.message(PARIS + NOW)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert required.finish_reason("stop", called) == "tool_calls"
    assert required.message("") == ({"role": "assistant", "content": ""}, False)
    text, calls = "", []
    for piece in [PARIS[:15], PARIS[15:40], PARIS[40:], NOW]:
        text += piece
        calls += required.delta(0, text, piece, not calls, text == PARIS + NOW)[0].get("tool_calls", [])
    assert [c["function"].get("name") for c in calls if "id" in c] == ["get_weather", "get_time"]
    assert json.loads("".join(c["function"].get("arguments", "") for c in calls if c["index"] == 0)) == \
        {"city": "Paris"}
    # without strict tool calling (or with a parser of no tag, pythonic), the forced answer is JSON
    assert ChatAnswers("required", hermes).json_calls and not ChatAnswers("auto", hermes).json_calls
