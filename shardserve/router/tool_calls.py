"""Tool calls in chat answers, as vLLM makes them.

"auto" (the model decides whether to call a tool, in its own format): a tool-call parser of the model family's
format reads the calls out of the answer (`--enable-auto-tool-choice --tool-call-parser NAME`). Without one,
"auto" is refused, as vLLM refuses it.

Forced (OpenAI's `tool_choice` "required" or a named function): where the server's parser knows its format as a
structural tag (hermes, llama3_json), the model writes calls in that format under a grammar of the given tools
(vLLM's strict tool calling, `tool_tags.py`) and the parser reads them as auto's. Otherwise structured outputs
hold the model to JSON of the tool's parameters (named) or to a list of {"name", "parameters"} objects
(required), and the answer's text becomes the message's `tool_calls`.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardserve.engine.reasoning import ReasoningParser, ReasoningStream
from shardserve.sampling_params import ParameterError


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function tool's parameters schema (an empty object where it declares none), by name."""
    functions = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("Each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                             "\"parameters\": {...}}}.")
        functions[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    return functions


_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def forced_tool_name(tool_choice) -> str | None:
    """The function a named tool_choice forces, else None (checked as vLLM checks it, in its words)."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    if not isinstance(function, dict):
        raise ParameterError(f"Invalid value for `function`: `{function}` in `tool_choice`! {_USAGE}",
                             "tool_choice.function")
    if "name" not in function:
        raise ParameterError(f"Expected field `name` in `function` in `tool_choice`! {_USAGE}",
                             "tool_choice.function.name")
    if not isinstance(function["name"], str) or not function["name"]:
        raise ParameterError(f"Invalid `name` in `function`: `{function['name']}` in `tool_choice`! {_USAGE}",
                             "tool_choice.function.name")
    return function["name"]


def checked_functions(tool_choice, tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """The request's functions' parameters by name, once its tool choice and tools are checked (in vLLM's
    words); None where the choice is "none" (or not made)."""
    if tools == []:
        raise ParameterError("`tools` must not be an empty array. Either provide at least one tool or omit the "
                             "field entirely.", "tools")
    if tool_choice in (None, "none"):
        return None
    if not tools:
        raise ParameterError("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if tool_choice not in ("required", "auto") and not isinstance(tool_choice, dict):
        raise ParameterError(f'Invalid value for `tool_choice`: {tool_choice}! Only named tools, "none", "auto" or '
                             f'"required" are supported.', "tool_choice")
    functions = _functions(tools)
    name = forced_tool_name(tool_choice)
    if name is not None and name not in functions:
        raise ParameterError("The tool specified in `tool_choice` does not match any of the specified `tools`",
                             "tool_choice")
    return functions


def tool_choice_schema(tool_choice, functions: dict[str, dict[str, Any]],
                       parallel_tool_calls: bool | None) -> dict[str, Any] | None:
    """The JSON schema the answer must follow for a forced tool choice (the named function's parameters, or a
    list of calls); None for "auto". `functions`: `checked_functions`."""
    name = forced_tool_name(tool_choice)
    if name is not None:
        return functions[name]
    if tool_choice == "auto":
        return None
    # "required": one call or more (one only when parallel_tool_calls is false), each naming a given function
    calls = [{"properties": {"name": {"type": "string", "enum": [n]}, "parameters": schema},
              "required": ["name", "parameters"]} for n, schema in functions.items()]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def tool_calls_from_text(tool_choice, text: str) -> list[dict[str, Any]]:
    """The message's tool calls from a forced tool choice's answer: the named function with the text as its
    arguments, or the required list's calls (none where the list is cut short, as by max_tokens)."""
    name = forced_tool_name(tool_choice)
    if name is not None:
        return [_call(name, text)] if text.strip() else []
    try:
        return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
    except (ValueError, KeyError, TypeError):  # not (yet) a whole list of calls
        return []


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


# auto: parsers of the models' own formats ---------------------------------------------------------------------

class HermesToolParser:
    """Hermes 2 Pro's format, which Qwen2.5 / Qwen3 and many fine-tunes share: each call is
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the answer's text before the first one is its
    content. A call cut short (no closing tag) still counts when its JSON is whole."""
    start, end = "<tool_call>", "</tool_call>"
    tag_model = "hermes"   # the format as a structural tag (tool_tags.py)
    _calls = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a whole answer; an answer whose calls do not parse is all content."""
        if self.start not in text:
            return text, []
        try:
            calls = [json.loads(closed or open_) for closed, open_ in self._calls.findall(text)]
            calls = [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
        except (ValueError, KeyError, TypeError):
            return text, []
        return text[:text.index(self.start)] or None, calls

    def stream(self) -> HermesStream:
        return HermesStream(self)


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag` (to hold back while streaming)."""
    return next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)


_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


@dataclass
class HermesStream:
    """A streamed choice in hermes' format, as vLLM streams it: the content as it comes (holding back what may be
    the start of a call's tag); each call's id and name once its JSON has named the function and begun its
    arguments, then the arguments' text as the model writes it. An answer that never gets that far in a call is
    all content at its end, as its whole reading is."""
    parser: HermesToolParser
    content_sent: int = 0      # characters of content sent
    arguments_sent: list[str] = field(default_factory=list)   # each call's arguments text sent so far

    @property
    def calls_sent(self) -> int:
        return len(self.arguments_sent)

    def advance(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new call deltas with their index) for the answer so far."""
        tag = self.parser.start
        first = text.find(tag)
        if first < 0:
            return self._content(text, len(text) - (0 if finished else _partial_tag(text, tag))), []
        deltas = []
        for i, (body, whole) in enumerate(self._bodies(text[first:])):
            name, arguments = _NAME.search(body), _ARGUMENTS.search(body)
            if i == self.calls_sent:  # this call's header is not sent yet
                if not (name and arguments):
                    break
                self.arguments_sent.append("")
                deltas.append({"index": i, "id": tool_call_id(), "type": "function",
                               "function": {"name": name.group(1)}})
            written = body[arguments.end():] if arguments else ""
            if whole:  # the object's own closing brace is not the arguments'
                written = written.rstrip()
                written = written[:-1].rstrip() if written.endswith("}") else written
            if len(written) > len(self.arguments_sent[i]):
                deltas.append({"index": i, "function": {"arguments": written[len(self.arguments_sent[i]):]}})
                self.arguments_sent[i] = written
        if finished and not self.calls_sent:  # calls never begun: the answer is all content
            return self._content(text, len(text)), []
        return self._content(text, first), deltas

    def _bodies(self, text: str) -> list[tuple[str, bool]]:
        """Each call's JSON text so far (from `text`, which starts with a call's tag), and whether it is whole:
        closed by its tag, or (cut short, or its closing tag not yet here) JSON already complete."""
        tag, close = self.parser.start, self.parser.end
        bodies, pos = [], 0
        while (begin := text.find(tag, pos)) >= 0:
            begin += len(tag)
            stop = text.find(close, begin)
            if stop >= 0:
                bodies.append((text[begin:stop].strip(), True))
                pos = stop + len(close)
                continue
            body = text[begin:]
            body = body[:len(body) - _partial_tag(body, close)].strip()
            try:
                whole = isinstance(json.loads(body), dict)
            except ValueError:
                whole = False
            bodies.append((body, whole))
            break
        return bodies

    def _content(self, text: str, end: int) -> str:
        content = text[self.content_sent:end]
        self.content_sent = max(self.content_sent, end)
        return content


def _opening(head: str, starts: tuple[str, ...]) -> bool | None:
    """Whether an answer beginning `head` opens with one of `starts`; None while it may still."""
    if not head or any(len(head) < len(s) and s.startswith(head) for s in starts):
        return None
    return head.startswith(starts)


class Llama3JsonToolParser:
    """Llama 3.x's JSON calls (vLLM's llama3_json / llama4_json): one object per call, {"name": ...,
    "parameters": {...}} ("arguments" is read too), ";" between them, perhaps after <|python_tag|>. Whole, as
    vLLM: every JSON object the answer holds must be a call, and then none of the text is content. Streamed, as
    vLLM: an answer that starts with a call (or the tag) is read when it ends; any other streams as content."""
    tag = "<|python_tag|>"
    tag_model = "llama"   # xgrammar's structural tag of the format (tool_tags.py)
    _objects = re.compile(r"\{")

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        if self.tag not in text and "{" not in text:
            return text, []
        calls, end, decoder = [], -1, json.JSONDecoder()
        for match in self._objects.finditer(text):
            if match.start() <= end:  # inside an object already read
                continue
            try:
                call, end = decoder.raw_decode(text, match.start())  # `end`: where the object ends in `text`
                arguments = call["arguments"] if "arguments" in call else call["parameters"]
                calls.append(_call(call["name"], json.dumps(arguments, ensure_ascii=False)))
            except (ValueError, KeyError, TypeError):
                return text, []
        return (None, calls) if calls else (text, [])

    def opens_call(self, text: str) -> bool | None:
        return _opening(text.lstrip(), ("{", self.tag))

    def stream(self) -> WholeAnswerStream:
        return WholeAnswerStream(self)


# JSON's literals, which models write in pythonic calls too (vLLM reads them)
_JSON_NAMES = {"null": None, "true": True, "false": False}


class PythonicToolParser:
    """Llama 3.2's and Llama 4's pythonic calls (vLLM's pythonic / llama4_pythonic): the answer is a Python list
    of calls with keyword arguments, `[get_weather(city="Paris"), get_time(zone="UTC")]` (Llama 4's perhaps
    between <|python_start|> and <|python_end|>). Read with Python's parser, never run: each argument must be a
    literal (JSON's null / true / false too; tuples and sets become lists). Any other answer is content; as
    vLLM, streamed, an answer that starts with "[" is read when it ends."""
    start, end = "<|python_start|>", "<|python_end|>"
    tag_model = None   # no structural tag: forced calls are JSON (as vLLM)
    # as vLLM's pattern: "[" then a call at once; names (of functions and arguments) begin with an ASCII letter
    _opens, _name = re.compile(r"\[[a-zA-Z]"), re.compile(r"[a-zA-Z]")

    def __init__(self, llama4: bool = False):
        self.starts = ("[", self.start) if llama4 else ("[",)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        code = text
        if self.start in self.starts and code.startswith(self.start):
            code = code[len(self.start):].replace(self.end, "")
        if not self._opens.match(code):
            return text, []
        try:
            tree = ast.parse(code).body[0]
            calls = tree.value.elts if isinstance(tree, ast.Expr) and isinstance(tree.value, ast.List) else []
            if not calls or not all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args and
                                    self._name.match(c.func.id) and all(k.arg and self._name.match(k.arg)
                                                                        for k in c.keywords) for c in calls):
                return text, []
            return None, [_call(c.func.id, json.dumps({k.arg: _literal(k.value) for k in c.keywords},
                                                      ensure_ascii=False)) for c in calls]
        except (SyntaxError, ValueError, IndexError, RecursionError, MemoryError):
            return text, []

    def opens_call(self, text: str) -> bool | None:
        return _opening(text, self.starts)

    def stream(self) -> WholeAnswerStream:
        return WholeAnswerStream(self)


def _literal(node: ast.expr) -> Any:
    """A pythonic call's argument as JSON's value; ValueError where it is no literal."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.JoinedStr) and all(isinstance(part, ast.Constant) for part in node.values):
        return "".join(str(part.value) for part in node.values)  # an f-string without placeholders
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")


@dataclass
class WholeAnswerStream:
    """A streamed choice whose calls are the whole answer (llama3_json, pythonic): its first characters decide
    whether it is a call, read when the answer ends, or content, streamed as it comes."""
    parser: Llama3JsonToolParser | PythonicToolParser
    content_sent: int = 0
    calls_sent: int = 0
    is_call: bool | None = None   # undecided while the answer may still begin with a call's opening

    def advance(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        if self.is_call is None:
            self.is_call = self.parser.opens_call(text)
        if not finished and self.is_call is not False:  # undecided, or a call not yet whole
            return "", []
        calls = self.parser.parse(text)[1] if self.is_call else []
        if calls:
            self.calls_sent = len(calls)
            return "", [{"index": i, **call} for i, call in enumerate(calls)]
        content, self.content_sent = text[self.content_sent:], len(text)
        return content, []


ToolCallParser = HermesToolParser | Llama3JsonToolParser | PythonicToolParser
TOOL_CALL_PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    "hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "llama4_json": Llama3JsonToolParser,
    "pythonic": PythonicToolParser, "llama4_pythonic": lambda: PythonicToolParser(llama4=True)}


class ChatAnswers:
    """A chat request's answers as assistant messages: the text as content, or its tool calls (what the server's
    parser reads out of it, or a forced choice's JSON). A reasoning model's thinking
    (--reasoning-parser) comes first, as `reasoning`; the tool calls are read from the rest. Streamed, one state
    per choice."""

    def __init__(self, tool_choice, parser: ToolCallParser | None, reasoning: ReasoningParser | None = None,
                 include_reasoning: bool = True, parser_reads_forced: bool = False):
        """`parser_reads_forced`: a forced choice's answer is in the parser's format (strict tool calling)."""
        self.tool_choice = tool_choice
        self.named = forced_tool_name(tool_choice)
        self.forced = self.named is not None or tool_choice == "required"
        self.parser = parser if tool_choice == "auto" or (self.forced and parser_reads_forced) else None
        self.json_calls = self.forced and self.parser is None   # the answer is JSON of the call(s)
        self.reasoning = reasoning
        self.include_reasoning = include_reasoning
        self.plain = not self.json_calls and self.parser is None and reasoning is None
        self._streams: dict[int, HermesStream | WholeAnswerStream] = {}
        self._thoughts: dict[int, ReasoningStream] = {}

    @property
    def hides_thinking(self) -> bool:
        """The thinking is not returned (include_reasoning false): nor are logprobs, which would show it (vLLM)."""
        return self.reasoning is not None and not self.include_reasoning

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """(the message, whether it calls tools). A forced call's content is "" (vLLM); auto's is the text before
        the calls (None if there is none), or all of it where there are no calls."""
        if self.plain:
            return {"role": "assistant", "content": text}, False
        thinking = {}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text)
            thinking = {"reasoning": reasoning if self.include_reasoning else None}
        if not self.json_calls and self.parser is None:
            return {"role": "assistant", "content": text, **thinking}, False
        if self.parser:  # (text None: the answer is all thinking)
            content, calls = self.parser.parse(text) if text is not None else (None, [])
            if calls and content is not None and not content.strip():
                content = None   # only whitespace before the calls (vLLM)
            if self.forced:   # as vLLM: a forced call's content is "" where it has none
                content = content if content and content.strip() else ""
        else:
            content, calls = "", tool_calls_from_text(self.tool_choice, text or "")
        return {"role": "assistant", "content": content, **thinking, **({"tool_calls": calls} if calls else {})}, \
            bool(calls)

    def finish_reason(self, finish_reason: str | None, called: bool, streamed: bool = False) -> str | None:
        """OpenAI's rule, as vLLM: "tool_calls" where auto found calls, or "required" calls ended normally;
        "stop" for a named call. Streamed (vLLM's stream): "tool_calls" where calls were sent and the answer
        ended normally."""
        if finish_reason is None or self.named is not None:
            return finish_reason
        if streamed:
            return "tool_calls" if called and finish_reason == "stop" else finish_reason
        if (self.parser and called) or (self.tool_choice == "required" and finish_reason == "stop"):
            return "tool_calls"
        return finish_reason

    def delta(self, index: int, text: str, new_text: str, first: bool, finished: bool) -> tuple[dict, bool]:
        """A streamed choice's delta for its answer so far (`new_text` the part not yet seen), and whether the
        choice has called tools so far. Thinking streams as it comes; then a named call streams its arguments as
        they come (its id and name first); a required list's calls come whole once the list is; auto's content
        as it comes, and its calls as the parser's stream gives them."""
        fields: dict[str, Any] = {}
        if self.reasoning is not None:
            thought = self._thoughts.setdefault(index, self.reasoning.stream())
            started = bool(thought.content)
            new_reasoning, new_text = thought.advance(text)
            text, first = thought.content, not started and bool(new_text)
            if new_reasoning and self.include_reasoning:
                fields["reasoning"] = new_reasoning
        if self.json_calls and self.named is not None:
            call = {"index": 0, "function": {"arguments": new_text}}
            if first:
                call = {"index": 0, "id": tool_call_id(), "type": "function",
                        "function": {"name": self.named, "arguments": new_text}}
            return ({**fields, "tool_calls": [call]} if new_text or first else fields), True
        if self.json_calls:   # "required"
            calls = tool_calls_from_text(self.tool_choice, text) if finished else []
            return ({**fields, "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]} if calls else fields), \
                bool(calls)
        if self.parser is None:  # plain content after the thinking
            return ({**fields, "content": new_text} if new_text else fields), False
        stream = self._streams.setdefault(index, self.parser.stream())
        content, calls = stream.advance(text, finished)
        return {**fields, **({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}, \
            stream.calls_sent > 0

    def reasoning_tokens(self, outputs: list) -> int | None:
        """The completion tokens the choices spent thinking, where the server reads reasoning (vLLM's usage
        detail), else None."""
        if self.reasoning is None:
            return None
        return sum(self.reasoning.count_reasoning_tokens(c.token_ids) for c in outputs)
