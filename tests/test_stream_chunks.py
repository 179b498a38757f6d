"""Streamed chunks are written from templates (router/serving.py `_ChunkEncoder`): each must parse to the chunk
that encoding a dict would give, whatever the text holds."""
import json

import pytest

from shardserve.router.serving import _ChunkEncoder, _json

META = {"id": "cmpl-\"quoted\"\\", "created": 1700000000, "model": "m/ü"}
TEXTS = ["", " plain", 'a "quote" and a \\ backslash', "new\nline\ttab\r", "ü é 中文 🙂", "\x00\x1f\u2028",
         "\ud800"]


@pytest.mark.parametrize("text", TEXTS)
def test_completion_chunk_parses_to_its_fields(text):
    logprobs = {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}], "text_offset": [3]}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    for fields, chunk_usage in [((0, text, None, None, None), None), ((2, text, logprobs, "stop", 7), usage),
                                ((1, text, None, "length", "</s>"), None)]:
        index, _, lp, finish, stop = fields
        chunk = json.loads(_ChunkEncoder(META, "text_completion").choice(
            index, "text", _json(text), lp, finish, stop, usage=chunk_usage))
        expected = {**META, "object": "text_completion",
                    "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish,
                                 "stop_reason": stop}]}
        if chunk_usage is not None:
            expected["usage"] = chunk_usage
        assert chunk == expected


@pytest.mark.parametrize("text", TEXTS)
def test_chat_chunk_parses_to_its_fields(text):
    encoder = _ChunkEncoder(META, "chat.completion.chunk")
    delta = '{"content": %s}' % _json(text)
    chunk = json.loads(encoder.choice(1, "delta", delta, {"content": []}, "stop", None))
    assert chunk == {**META, "object": "chat.completion.chunk",
                     "choices": [{"index": 1, "delta": {"content": text}, "logprobs": {"content": []},
                                  "finish_reason": "stop", "stop_reason": None}]}
    last = json.loads(encoder.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert last == {**META, "object": "chat.completion.chunk", "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
