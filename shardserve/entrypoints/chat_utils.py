"""Chat conversations become prompt text through a Jinja chat template (the tokenizer's or one given).

Shared by every front that takes OpenAI-style messages: `LLM.chat` now, the chat HTTP route later.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

_JINJA_MARKERS = ("{{", "{%", "{#")
# apply_chat_template arguments that would change what it returns, not what it renders.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_dict", "return_tensors", "padding", "truncation",
                             "max_length", "return_assistant_tokens_mask", "tokenizer_kwargs"}
_HOW_TO_PASS = ("pass chat_template= to LLM.chat or LLM(chat_template=...) (--chat-template on the command "
                "line): a Jinja template string or the path of a file holding one")


def load_chat_template(chat_template: str | os.PathLike | None) -> str | None:
    """None, the path of a Jinja file (read), or a template string (returned as is)."""
    if chat_template is None:
        return None
    if isinstance(chat_template, os.PathLike):
        path = os.fspath(chat_template)
        if not os.path.isfile(path):
            raise ValueError(f"The chat template file {path!r} does not exist.")
        return _read(path)
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a string or a path, got {type(chat_template).__name__}.")
    if _is_file(chat_template):
        return _read(chat_template)
    if any(marker in chat_template for marker in _JINJA_MARKERS):
        return chat_template
    raise ValueError(f"The chat template {chat_template!r} looks like a file path, but no such file exists (and "
                     f"it holds no Jinja syntax, so it is not a template either).")


def _is_file(text: str) -> bool:
    if "\n" in text or any(marker in text for marker in _JINJA_MARKERS):
        return False
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):  # a name too long, or with a NUL byte, is no file
        return False


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def resolve_chat_template(tokenizer, chat_template: str | os.PathLike | None = None,
                          tools: list[dict] | None = None) -> str:
    """The template to render with: the one given, else the tokenizer's own, else a ValueError saying how to
    pass one. A tokenizer with several named templates also accepts a template's name."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if chat_template is not None:
        if isinstance(own, dict) and isinstance(chat_template, str) and chat_template in own:
            return own[chat_template]
        return load_chat_template(chat_template)
    if not own:
        raise ValueError(f"The tokenizer has no chat template, and none was given: {_HOW_TO_PASS}.")
    if isinstance(own, dict):
        return tokenizer.get_chat_template(None, tools)
    return own


def template_iterates_content(chat_template: str) -> bool:
    """Whether the template loops over a message's content (OpenAI-style parts, as vLLM's "openai" content
    format) rather than printing it as one string."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:  # e.g. transformers' own {% generation %} tag: assume strings
        return False
    for loop in ast.find_all(nodes.For):
        target = loop.iter
        while isinstance(target, (nodes.Filter, nodes.Test)) and target.node is not None:
            target = target.node
        if isinstance(target, nodes.Getitem) and isinstance(target.arg, nodes.Const) \
                and target.arg.value == "content":
            return True
        if isinstance(target, nodes.Getattr) and target.attr == "content":
            return True
    return False


def parse_conversation(messages: Sequence[Mapping[str, Any]], content_as_parts: bool) -> list[dict[str, Any]]:
    """Validated copies of the messages; content given as text parts becomes one string (parts joined by
    newlines, as vLLM does) unless the template reads the parts itself."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"A conversation must be a list of messages, got {type(messages).__name__}.")
    if not messages:
        raise ValueError("A conversation needs at least one message.")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"Message {i} must be a dict with 'role' and 'content', got {type(message).__name__}.")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"Message {i} needs a string 'role'.")
        message = dict(message)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            texts = _text_parts(content, i)
            message["content"] = [{"type": "text", "text": t} for t in texts] if content_as_parts \
                else "\n".join(texts)
        conversation.append(message)
    return conversation


def _text_parts(content, index: int) -> list[str]:
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise TypeError(f"Message {index}'s content must be a string or a list of content parts, got "
                        f"{type(content).__name__}.")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, Mapping):
            raise ValueError(f"Message {index} has a content part of type {part.get('type')!r}; only text parts "
                             f"({{'type': 'text', 'text': ...}}) are supported.")
        else:
            raise TypeError(f"Message {index}'s content parts must be dicts, got {type(part).__name__}.")
    return texts


CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's chat_template_content_format


def check_content_format(content_format: str) -> str:
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got "
                         f"{content_format!r}.")
    return content_format


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], chat_template: str | None = None, *,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                content_format: str = "auto") -> str:
    """One conversation rendered to prompt text with transformers' `apply_chat_template`.

    `chat_template_kwargs` reach the template; as in vLLM they may also override the named arguments.
    `content_format` (vLLM's chat_template_content_format): how a message's content parts reach the template:
    "string" joined into one text, "openai" as the list of {"type": "text", "text": ...} parts, "auto" as the
    template reads them (parts where it loops over a message's content)."""
    kwargs: dict[str, Any] = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message, tools=tools)
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(extra))
    if reserved:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}.")
    kwargs.update(extra)
    if kwargs["continue_final_message"] and kwargs["add_generation_prompt"]:
        raise ValueError("Cannot set both continue_final_message=True and add_generation_prompt=True: continuing "
                         "the final message needs add_generation_prompt=False.")
    template = resolve_chat_template(tokenizer, kwargs.pop("chat_template"), kwargs["tools"])
    as_parts = template_iterates_content(template) if check_content_format(content_format) == "auto" \
        else content_format == "openai"
    conversation = parse_conversation(messages, as_parts)
    if kwargs["continue_final_message"] and conversation[-1]["role"] != "assistant":
        raise ValueError(f"continue_final_message=True continues the final assistant message, but the last "
                         f"message is from {conversation[-1]['role']!r}.")
    return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False, **kwargs)
