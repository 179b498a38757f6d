"""Incremental detokenization and stop-string matching, one request at a time.

Text is produced by decoding a short window that starts a few tokens back (so SentencePiece's leading
spaces and byte-level merges see their context) and emitting only what grew since the last read. A window
that ends inside a UTF-8 character decodes to U+FFFD and is held back until the character completes.

Without stop strings nothing depends on the text until it is read, so tokens are only collected as they come
and decoded together when `output_text` is read: once at the end for an offline request, every step for one
streamed token by token. (At a few hundred requests a step, two decodes per token were a large share of the
host's step.) A read of one new token (a streamed request, or one with stop strings) goes to `tokenizers`'
`DecodeStream`, which keeps the same window and makes the same two decodes in one call (2.7 -> 1.5 us a token on
a 2-core CPU); its state is rebuilt from the window whenever reads of several tokens have moved it on.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from shardserve.sampling_params import SamplingParams

# Tokens of prompt context the first decode looks back over.
_INITIAL_CONTEXT = 5


def rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer whose decode is the Rust one's alone (no
    subclass's own decode, no clean-up of tokenization spaces), else None."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(tokenizer)
    plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and cls.decode is PreTrainedTokenizerBase.decode
             and cls._decode is PreTrainedTokenizerFast._decode and not tokenizer.clean_up_tokenization_spaces)
    return tokenizer.backend_tokenizer if plain else None


def fast_decode(tokenizer) -> Callable[..., str]:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, straight to the Rust tokenizer where transformers'
    wrapper would only add its own per-call work (converting the ids, checking for a batch): at a few hundred
    requests a step that work was most of a step's detokenization. Tokenizers that change what decode does keep
    their own."""
    rust = rust_tokenizer(tokenizer)
    return tokenizer.decode if rust is None else rust.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 decode: Callable[..., str] | None = None):
        """`decode`: the tokenizer's decode (`fast_decode(tokenizer)`, made once for many requests)."""
        self.tokenizer = tokenizer
        self.decode = decode or (tokenizer and fast_decode(tokenizer))
        self.params = params
        self.token_ids = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self.read_offset = len(self.token_ids)
        self.prefix_offset = 0
        self._text = ""
        self.num_pending = 0  # tokens appended since the text was last brought up to date
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        # While a request runs, its text's last characters may be the start of a stop string that a later token
        # completes, and the stop string is then cut off: they are not reported until it is known (vLLM's rule)
        self.stop_buffer = self.max_stop_len - 1 if self.max_stop_len and not params.include_stop_str_in_output \
            else 0
        self._rust = None      # (a one-token read) the Rust tokenizer, False where there is none
        self._stream = None    # its DecodeStream, in step with the window below; None: to be rebuilt
        self._fed = 0          # the tokens of `token_ids` the stream has taken

    @property
    def output_text(self) -> str:
        if self.num_pending:
            self._catch_up()
        return self._text

    def text_to_report(self, finished: bool) -> str:
        """The text an output carries: all of it once finished, else without what may be a stop string's start."""
        text = self.output_text
        return text[:len(text) - self.stop_buffer] if self.stop_buffer and not finished else text

    def _decode(self, ids: list[int]) -> str:
        return self.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add a token; returns the stop string it completed, if any (the text is then truncated)."""
        self.token_ids.append(token_id)
        if self.tokenizer is None or not self.params.detokenize:
            return None
        self.num_pending += 1
        if not self.params.stop:
            return None
        num_new_chars = self._catch_up()
        return self._check_stop(num_new_chars) if check_stop and num_new_chars else None

    def _catch_up(self, together: bool = True) -> int:
        """Decode the pending tokens into the text; returns the number of characters added. `together`: the
        pending tokens at once (else as the last token appended, those before it held back)."""
        if together and self.num_pending == 1:
            num_added = self._stream_step()
            if num_added is not None:
                return num_added
        self._stream = None  # the window moves on without it
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self._text += new_text
            self.num_pending = 0
            return len(new_text)
        if not together or self.num_pending == 1 or not full.endswith("\ufffd"):
            return 0  # held back until a character completes
        # A character still incomplete at the end: the text before it is emitted as token by token would be
        num_added, pending = 0, self.token_ids[len(self.token_ids) - self.num_pending:]
        del self.token_ids[len(self.token_ids) - self.num_pending:]
        self.num_pending = 0
        for token_id in pending:
            self.token_ids.append(token_id)
            self.num_pending += 1
            num_added += self._catch_up(together=False)
        return num_added

    def _stream_step(self) -> int | None:
        """The one pending token through the DecodeStream (what the two decodes below would give); None where
        there is none, or it failed (a decoder whose text does not extend its prefix's: the decodes below)."""
        if self._rust is None:
            self._rust = rust_tokenizer(self.tokenizer) or False
        if not self._rust:
            return None
        if self._stream is not None and self._fed == len(self.token_ids):
            return 0  # read again: the stream holds the token back already
        try:
            if self._stream is None or self._fed != len(self.token_ids) - 1:
                from tokenizers.decoders import DecodeStream
                self._stream = DecodeStream(ids=self.token_ids[self.prefix_offset:self.read_offset],
                                            skip_special_tokens=self.params.skip_special_tokens)
            new_text = self._stream.step(self._rust, self.token_ids[-1])
        except Exception:  # noqa: BLE001 - an old tokenizers, or a prefix its decoder rewrote: not tried again
            self._stream, self._rust = None, False
            return None
        self._fed = len(self.token_ids)
        if new_text is None:  # held back until a character completes (the stream keeps the token)
            return 0
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._text += new_text
        self.num_pending = 0
        return len(new_text)

    def _check_stop(self, num_new_chars: int) -> str | None:
        if not self.params.stop:
            return None
        # A stop string may have begun in earlier text: search back far enough to catch it.
        search_from = max(0, len(self._text) - num_new_chars - self.max_stop_len + 1)
        best = None
        for stop in self.params.stop:
            idx = self._text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self._text = self._text[:idx + len(stop) if self.params.include_stop_str_in_output else idx]
        return stop


def logprob_token_text(tokenizer, token_id: int, context: list[int]) -> str:
    """A logprob entry's token as text, as vLLM reads it. A token that ends inside a UTF-8 character (byte-level
    and byte-fallback vocabularies) decodes to U+FFFD on its own: it reads "" instead, and the token that
    completes the character, after up to 4 tokens of `context` (the tokens before it), carries the whole
    character."""
    text = tokenizer.decode([token_id])
    if not text.endswith("\ufffd"):
        # SentencePiece's decode drops a lone token's word-start markers (U+2581): as in vLLM, the spaces they
        # stand for are put back
        raw = str(tokenizer.convert_ids_to_tokens(token_id))
        missing = (len(raw) - len(raw.lstrip("\u2581"))) - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text
    context = context[-4:]
    for n in range(1, len(context) + 1):
        before = context[-n:]
        full = tokenizer.decode(before + [token_id])
        if full.endswith("\ufffd"):
            continue
        # the tokens before it that were incomplete too read "": their bytes are this token's text
        clean = len(before)
        while clean and tokenizer.decode([before[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        prefix = tokenizer.decode(before[:clean]) if clean else ""
        return full[len(os.path.commonprefix([prefix, full])):]
    return ""
