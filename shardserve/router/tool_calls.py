"""Forced tool calls (OpenAI's `tool_choice` "required" or a named function), as vLLM makes them: structured
outputs hold the model to JSON of the tool's parameters (named) or to a list of {"name", "parameters"} objects
(required), and the answer's text becomes the message's `tool_calls`.

"auto" (the model decides whether to call a tool, in its own format) needs a tool-call parser per model family,
which is not implemented: it is refused, as vLLM refuses it without --tool-call-parser.
"""
from __future__ import annotations

import json
import uuid
from typing import Any


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


def forced_tool_name(tool_choice) -> str | None:
    """The function a named tool_choice forces, else None."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("A named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}.")
        return name
    return None


def tool_choice_schema(tool_choice, tools: list[dict[str, Any]] | None,
                       parallel_tool_calls: bool | None) -> dict[str, Any] | None:
    """The JSON schema the answer must follow for a forced tool choice; None for "none" (or no choice)."""
    if tool_choice in (None, "none"):
        return None
    if tool_choice not in ("required", "auto") and not isinstance(tool_choice, dict):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}.")
    if not tools:
        raise ValueError("When using `tool_choice`, `tools` must be set.")
    functions = _functions(tools)
    name = forced_tool_name(tool_choice)
    if name is not None:
        if name not in functions:
            raise ValueError(f"Tool '{name}' has not been passed in `tools`.")
        return functions[name]
    if tool_choice == "auto":
        return None  # the caller refuses it: no parser
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
