"""Tool calls held to the model's own format (vLLM's strict tool calling, on by default since vLLM 0.32).

Where the server's tool-call parser knows its format as an xgrammar structural tag (hermes' `<tool_call>` tags,
Llama 3's JSON objects), a forced call ("required", or a named function) is written in that format, under a
grammar that admits only calls of the given tools, and the parser reads it as it reads "auto" answers (no JSON
list of calls the model was never trained to write). "auto" is held to the format once the model opens a call
where a tool asks for it (`"strict": true`) or the server's `--tool-strict-level` does:

- auto: tags only where a tool is strict; a strict tool's arguments follow its schema, others' are any JSON;
- function: every request with tools gets the tags (a call must name a given tool), arguments as in auto;
- parameter: as function, and every tool's arguments follow its schema.

`parallel_tool_calls: false` needs the tags to stop after one call, so it raises the level to function.
`VLLM_ENFORCE_STRICT_TOOL_CALLING=0` turns it all off: forced calls are JSON again (`tool_calls.py`).
"""
from __future__ import annotations

import enum
import json
import os
from typing import Any

from shardserve.sampling_params import StructuredOutputsParams


def strict_tool_calling() -> bool:
    """vLLM's VLLM_ENFORCE_STRICT_TOOL_CALLING (default on)."""
    return os.environ.get("VLLM_ENFORCE_STRICT_TOOL_CALLING", "true").strip().lower() in ("1", "true")


class ToolStrictLevel(enum.IntEnum):
    AUTO = 0
    FUNCTION = 1
    PARAMETER = 2

    @classmethod
    def from_name(cls, name: str) -> ToolStrictLevel:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"tool_strict_level must be one of auto, function, parameter, got {name!r}.") from None


def tool_call_tag(model: str, tools: list[dict[str, Any]], tool_choice, parallel_tool_calls: bool | None,
                  level: ToolStrictLevel, structured: StructuredOutputsParams | None) -> str | None:
    """The structural tag (xgrammar's JSON) a chat request's answer is held to, or None where its tool choice
    leaves the answer free (or to its own `structured` constraint). `model`: the format's name (hermes, llama);
    `tools` and `tool_choice` already checked (`tool_calls.checked_functions`)."""
    from xgrammar.structural_tag import OrFormat, StructuralTag
    auto = tool_choice == "auto"
    single = parallel_tool_calls is False
    if single and not (auto and structured is not None):
        level = max(level, ToolStrictLevel.FUNCTION)
    functions = [t["function"] for t in tools]
    if auto and level == ToolStrictLevel.AUTO and not any(f.get("strict") is True for f in functions):
        return None
    tools = [{"type": "function", "function": {**f, "strict": level >= ToolStrictLevel.PARAMETER or
                                               f.get("strict") is True}} for f in functions]
    answer_format = None
    if auto and structured is not None:
        # the answer is a call or follows its own constraint: "required" calls, or that constraint
        answer_format = _as_format(structured)
        if answer_format is None:
            return None
        tool_choice = "required"
    tag = _model_tag(model, tools, tool_choice)
    if single:
        _stop_after_first_call(tag.format)
    if answer_format is not None:
        tag = StructuralTag(format=OrFormat(elements=[tag.format, answer_format]))
    return json.dumps(tag.model_dump())


def _model_tag(model: str, tools: list[dict[str, Any]], tool_choice):
    if model == "hermes":
        return _hermes_tag(tools, tool_choice)
    from xgrammar import get_model_structural_tag  # xgrammar's own formats (llama)
    return get_model_structural_tag(model=model, tools=tools, tool_choice=tool_choice, reasoning=False)


def _hermes_tag(tools: list[dict[str, Any]], tool_choice):
    """Hermes' calls, `<tool_call>{"name": NAME, "arguments": ARGS}</tool_call>`, on one line or with the tags
    on lines of their own (both are written); free text until the first one where the model decides."""
    from xgrammar import normalize_tool_choice
    from xgrammar.structural_tag import (
        AnyTextFormat, JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat, TriggeredTagsFormat)
    tools, _, choice = normalize_tool_choice(tools, tool_choice)   # forced: the named tool alone
    tags = [TagFormat(begin=f'{begin}{{"name": "{tool.function.name}", "arguments": ',
                      content=JSONSchemaFormat(json_schema=_arguments_schema(tool.function)), end=f"}}{end}")
            for tool in tools for begin, end in (("<tool_call>\n", "\n</tool_call>"), ("<tool_call>", "</tool_call>"))]
    if choice == "auto":
        return StructuralTag(format=TriggeredTagsFormat(triggers=["<tool_call>"], tags=tags) if tags
                             else AnyTextFormat())
    return StructuralTag(format=TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True,
                                                        stop_after_first=choice == "forced"))


def _arguments_schema(function) -> dict[str, Any] | bool:
    """A strict tool's arguments follow its schema; any other's are any JSON value (xgrammar's `true`)."""
    if function.strict is False:
        return True
    return function.parameters if function.parameters is not None else True


def _stop_after_first_call(node) -> None:
    """parallel_tool_calls false: each list of calls in the tag ends after its first call."""
    from pydantic import BaseModel
    from xgrammar.structural_tag import TagsWithSeparatorFormat, TokenTriggeredTagsFormat, TriggeredTagsFormat
    if isinstance(node, (TriggeredTagsFormat, TokenTriggeredTagsFormat, TagsWithSeparatorFormat)):
        node.stop_after_first = True
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            _stop_after_first_call(getattr(node, name))
    elif isinstance(node, (list, tuple)):
        for item in node:
            _stop_after_first_call(item)


def _as_format(structured: StructuredOutputsParams):
    """A request's own constraint as a structural tag's format, or None where it has none (it then applies
    alone, and "auto" calls are left free)."""
    from xgrammar.structural_tag import (
        ConstStringFormat, GrammarFormat, JSONSchemaFormat, OrFormat, RegexFormat, StructuralTag, TagFormat,
        TriggeredTagsFormat)
    kind = structured.kind
    if kind == "json_object":
        return JSONSchemaFormat(json_schema={"type": "object"})
    if kind == "json":
        schema = structured.json
        return JSONSchemaFormat(json_schema=json.loads(schema) if isinstance(schema, str) else schema)
    if kind == "regex":
        return RegexFormat(pattern=structured.regex)
    if kind == "choice":
        return OrFormat(elements=[ConstStringFormat(value=c) for c in structured.choice])
    if kind == "grammar" and "::=" in structured.grammar:   # EBNF only (a Lark grammar applies alone)
        return GrammarFormat(grammar=structured.grammar)
    if kind == "structural_tag":
        tag = json.loads(structured.structural_tag)
        if isinstance(tag, dict) and "structures" in tag:
            return TriggeredTagsFormat(triggers=tag["triggers"], tags=[
                TagFormat(begin=s["begin"], content=JSONSchemaFormat(json_schema=s["schema"]), end=s["end"])
                for s in tag["structures"]])
        return StructuralTag.model_validate(tag).format
    return None
