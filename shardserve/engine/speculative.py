"""Speculative decoding by n-gram lookup (vLLM's `speculative_config={"method": "ngram", ...}`).

Text often repeats itself (code under edit, a document being summarised or quoted, a JSON schema's keys): when
the last few tokens of a sequence appeared earlier in it, the tokens that followed them then are a good guess
for what follows now. The engine proposes up to `num_speculative_tokens` such draft tokens for a request and
runs them through the model in the same step as its last token, as a short query over its KV cache. Each
position's logits give the token the model would have produced there; the drafts are kept while they agree
with it, and the first disagreement is replaced by the model's own token. A step then yields 1 to k + 1
tokens for the cost of one decode step with a few more query rows: a decode reads all the weights for any
number of rows, so on a memory-bound decode the extra rows are nearly free.

Verification samples every position as a plain step would (same temperature, top-k, top-p), so the output is
distributed as without speculation: a draft is a single token, so accepting it when the sample equals it,
and otherwise keeping the sample, is exactly rejection sampling against a one-hot draft distribution. Greedy
requests produce the tokens they would produce without it.

Rules that read a request's output (penalties, bad words, min_tokens) count the drafts before each position as
its tokens, so every row is sampled under the rules a plain step at that position would apply. A grammar or a
thinking budget (whose state advances token by token on the engine's side), seeded sampling (whose draws must not
depend on how many drafts were accepted), beams and prompt embeddings (whose prompt ids are placeholders) get no
drafts: they decode as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardserve.engine.request import Request


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config, for the method built here: n-gram lookup in the request's own tokens.
    `num_speculative_tokens_per_batch_size` (vLLM's dynamic schedule): ((first, last, k), ...) batch-size ranges
    and the drafts a request may take at those sizes (at most num_speculative_tokens); a size between ranges keeps
    the k of the range before it, and a size past the last range that range's k."""
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    method: str = "ngram"
    num_speculative_tokens_per_batch_size: tuple[tuple[int, int, int], ...] | None = None

    def max_drafts(self, batch_size: int) -> int:
        """The drafts a request may take in a step of `batch_size` running requests."""
        schedule = self.num_speculative_tokens_per_batch_size
        if schedule is None:
            return self.num_speculative_tokens
        k = schedule[0][2]
        for first, _, range_k in schedule:
            if first > batch_size:
                break
            k = range_k
        return min(k, self.num_speculative_tokens)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """From vLLM's dict, with vLLM's defaults and checks (either lookup bound gives the other)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}.")
        options = dict(value)
        method = options.pop("method", None) or options.pop("model", None) or "ngram"
        options.pop("model", None)
        if method not in ("ngram", "[ngram]"):
            raise ValueError(f"speculative_config method {method!r} is not built: only 'ngram' (prompt lookup) "
                             f"proposes drafts here, with no draft model.")
        known = {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "num_speculative_tokens_per_batch_size"}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"speculative_config takes method, num_speculative_tokens, prompt_lookup_max, "
                             f"prompt_lookup_min and num_speculative_tokens_per_batch_size for 'ngram', got "
                             f"{', '.join(sorted(unknown))}.")
        k = options.get("num_speculative_tokens")
        if k is None:
            raise ValueError("speculative_config needs num_speculative_tokens.")
        low, high = options.get("prompt_lookup_min"), options.get("prompt_lookup_max")
        if low is None and high is None:
            low = high = 5   # vLLM's defaults
        low, high = (high if low is None else low), (low if high is None else high)
        for name, n in (("num_speculative_tokens", k), ("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"speculative_config {name} must be a positive integer, got {n!r}.")
        if low > high:
            raise ValueError(f"prompt_lookup_min={low} must be <= prompt_lookup_max={high}")
        schedule = options.get("num_speculative_tokens_per_batch_size")
        return cls(num_speculative_tokens=k, prompt_lookup_max=high, prompt_lookup_min=low,
                   num_speculative_tokens_per_batch_size=None if schedule is None else _batch_size_schedule(schedule))


def _batch_size_schedule(schedule) -> tuple[tuple[int, int, int], ...]:
    """vLLM's rules for a dynamic schedule: (first, last, k) entries, ranges of positive sizes that do not
    overlap, the first from 1, k >= 0; sorted by first."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError("num_speculative_tokens_per_batch_size must be a non-empty list of (range_start, "
                         "range_end, num_speculative_tokens) entries.")
    entries = []
    for entry in schedule:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
            raise ValueError(f"Each num_speculative_tokens_per_batch_size entry must be 3 integers: (range_start, "
                             f"range_end, num_speculative_tokens); got {entry!r}.")
        first, last, k = entry
        if first <= 0 or last < first:
            raise ValueError(f"Batch-size range ({first}, {last}) must be positive, its start <= its end.")
        if k < 0:
            raise ValueError("num_speculative_tokens_per_batch_size values must be >= 0.")
        entries.append((first, last, k))
    entries.sort()
    if any(first <= previous_last for (_, previous_last, _), (first, _, _) in zip(entries, entries[1:])):
        raise ValueError("Batch-size ranges must not overlap.")
    if entries[0][0] != 1:
        raise ValueError("The first batch-size range must start at 1 so every batch size has a number of drafts.")
    return tuple(entries)


def can_draft(req: Request) -> bool:
    """Whether a request may take draft tokens (see the module's note for those that may not)."""
    p = req.sampling_params
    if p is None or req.hold_kv or req.grammar is not None or req.prompt_embeds is not None:
        return False
    return p.thinking_token_budget is None and (p.seed is None or p.greedy)


class TokenIndex:
    """A request's tokens as a growing int32 array, so a lookup scans them without converting the list every
    step (kept on the request; it reads only the tokens appended since the last lookup)."""
    __slots__ = ("array", "length")

    def __init__(self):
        self.array = np.empty(256, np.int32)
        self.length = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n > len(self.array):
            grown = np.empty(max(n, 2 * len(self.array)), np.int32)
            grown[:self.length] = self.array[:self.length]
            self.array = grown
        if n > self.length:
            self.array[self.length:n] = tokens[self.length:n]
        self.length = n
        return self.array[:n]


class NgramProposer:
    """The longest n-gram (prompt_lookup_min..max tokens) that ends the sequence and also occurs earlier in it;
    the tokens after its earliest earlier occurrence are the drafts (vLLM's choice of match)."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_drafts = config.max_drafts   # at a batch size

    def propose(self, req: Request, max_drafts: int) -> list[int]:
        max_drafts = min(max_drafts, self.k)
        if max_drafts <= 0 or len(req.all_token_ids) <= self.min_n:
            return []
        if req.token_index is None:
            req.token_index = TokenIndex()
        tokens = req.token_index.sync(req.all_token_ids)
        n_tokens = len(tokens)
        # Earlier occurrences of the last token are the only places an n-gram ending the sequence can match:
        # extend each backwards as far as it agrees (at most max_n).
        ends = np.flatnonzero(tokens[:n_tokens - 1] == tokens[n_tokens - 1])
        if len(ends) == 0:
            return []
        matched = np.ones(len(ends), np.int32)
        alive = np.ones(len(ends), bool)
        for back in range(1, self.max_n):
            at = ends - back
            ok = alive & (at >= 0)
            ok[ok] = tokens[at[ok]] == tokens[n_tokens - 1 - back]
            if not ok.any():
                break
            matched += ok
            alive = ok
        longest = int(matched.max())
        if longest < self.min_n:
            return []
        start = int(ends[np.argmax(matched == longest)]) + 1   # the earliest occurrence of the longest n-gram
        return tokens[start:start + max_drafts].tolist()


@dataclass
class SpecDecodeStats:
    """Drafts proposed and accepted over the engine's life (vLLM reports the same pair as metrics)."""
    num_drafts: int = 0            # verification steps: requests' steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def add(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification step yields on average: the accepted drafts and the model's own one."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
