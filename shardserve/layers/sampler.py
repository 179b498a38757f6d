"""One vectorised sampler for the whole batch.

Order, as vLLM: logprobs from the raw logits; then logit bias, min-tokens masking and penalties; greedy
rows take the argmax; the others are scaled by temperature, filtered by min-p, top-k and top-p, and
sampled with the exponential race (argmax of p / q, q ~ Exp(1)), drawing q from the request's own
generator when it has a seed so its tokens do not depend on the rest of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.layers.attention import triton_backend

_HAVE_TRITON = triton_backend.available()


@dataclass
class SamplingBatch:
    """Per-row sampling state, as tensors on the logits' device. Optional fields are None when no row
    of the batch uses them, so the common case costs nothing."""
    temperature: torch.Tensor | None        # [B]; 0 marks a greedy row (None: every row is)
    all_greedy: bool
    top_p: torch.Tensor | None = None       # [B]
    top_k: torch.Tensor | None = None       # [B] long, vocab size where off
    min_p: torch.Tensor | None = None       # [B]
    generators: dict[int, torch.Generator] | None = None  # row -> seeded generator
    # penalties
    presence: torch.Tensor | None = None    # [B]
    frequency: torch.Tensor | None = None   # [B]
    repetition: torch.Tensor | None = None  # [B]
    # penalised (row, token) pairs, each once: those in the prompt or the output (repetition), and those in the
    # output with their counts (presence, frequency); a few hundred a row, where the vocabulary is ~100k
    seen: tuple[torch.Tensor, torch.Tensor] | None = None
    counted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    bias: torch.Tensor | None = None        # [B, V] additive logit bias, -inf for tokens min_tokens forbids
    max_num_logprobs: int = -1              # -1: no row wants its top logprobs
    wanted_ids: torch.Tensor | None = None  # [B, M] the ids rows want logprobs of (logprob_token_ids), -1 padding


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                 # [B]
    # When logprobs are wanted: [B, 1 + k (+ M)] ids / logprobs / ranks; column 0 is the sampled token, then the
    # top k, then from `wanted_start` the ids of SamplingBatch.wanted_ids.
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    logprob_ranks: torch.Tensor | None = None
    wanted_start: int = 0


# Reductions that also return an index (max, argmax, topk) run several times slower on a CPU than a plain
# maximum. Over a vocabulary they run on a short list instead: the maximum of each chunk of `_CHUNK` logits
# first, then only inside the chunks that can hold the answer.
_CHUNK = 128


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] (contiguous) as [B, V // _CHUNK, _CHUNK] chunks and the [B, V % _CHUNK] rest, both views."""
    rows, width = x.shape
    n = width // _CHUNK
    return x.as_strided((rows, n, _CHUNK), (width, _CHUNK, 1)), x[:, n * _CHUNK:]


if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_argmax_kernel(x_ptr, values_ptr, index_ptr, stride_x, V, NUM_CHUNKS: tl.constexpr,
                             BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        value, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(values_ptr + row * NUM_CHUNKS + chunk, value)
        tl.store(index_ptr + row * NUM_CHUNKS + chunk, chunk * BLOCK + index)

    @triton.jit
    def _argmax_of_chunks_kernel(values_ptr, index_ptr, out_ptr, NUM_CHUNKS: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        v = tl.load(values_ptr + row * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=float("-inf"))
        _, best = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.load(index_ptr + row * NUM_CHUNKS + best))


_ARGMAX_BLOCK = 2048


def triton_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of a [B, V] tensor (rows of finite values or -inf) in two kernels: the maximum of each
    chunk of a row in parallel, then the first chunk's. torch's argmax reduces a row in one thread block:
    at batch 1 over a 128k vocabulary that took ~28 us on an H200, 2% of a 1B model's decode step."""
    rows, V = x.shape
    num_chunks = triton.cdiv(V, _ARGMAX_BLOCK)
    values = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    if rows == 0:
        return out
    _chunk_argmax_kernel[(rows, num_chunks)](x, values, index, x.stride(0), V, num_chunks, BLOCK=_ARGMAX_BLOCK)
    _argmax_of_chunks_kernel[(rows,)](values, index, out, num_chunks, BLOCK_C=triton.next_power_of_2(num_chunks))
    return out


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's first maximum, as `x.argmax(-1)`."""
    if x.is_cuda:
        return triton_argmax(x) if _HAVE_TRITON and x.dim() == 2 and x.stride(1) == 1 else x.argmax(-1)
    if x.dim() != 2 or x.size(1) < 4 * _CHUNK:
        return x.max(-1).indices
    x = x.contiguous()
    main, rest = _chunks(x)
    best = main.amax(-1).max(-1)                                     # the first chunk holding the maximum
    rows = torch.arange(x.size(0), device=x.device)
    idx = best.indices * _CHUNK + main[rows, best.indices].max(-1).indices
    if rest.size(1):
        tail = rest.max(-1)
        idx = torch.where(tail.values > best.values, main.size(1) * _CHUNK + tail.indices, idx)
    return idx


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` of a [B, V] tensor (values, then indices; largest first). The k largest lie in
    the k chunks with the largest maxima: any other chunk's maximum is below k values of those chunks."""
    if x.dim() != 2 or x.size(1) < 4 * _CHUNK or k > x.size(1) // (4 * _CHUNK):
        return x.topk(k, dim=-1)
    x = x.contiguous()
    main, rest = _chunks(x)
    chunks = main.amax(-1).topk(k, dim=-1).indices                  # [B, k]
    rows = torch.arange(x.size(0), device=x.device).unsqueeze(1)
    candidates = main[rows, chunks].reshape(x.size(0), k * _CHUNK)  # [B, k * CHUNK]
    ids = (chunks.unsqueeze(-1) * _CHUNK + torch.arange(_CHUNK, device=x.device)).reshape(x.size(0), -1)
    if rest.size(1):
        start = main.size(1) * _CHUNK
        candidates = torch.cat([candidates, rest], dim=1)
        ids = torch.cat([ids, torch.arange(start, x.size(1), device=x.device).expand(x.size(0), -1)], dim=1)
    values, where = candidates.topk(k, dim=-1)
    return values, ids.gather(1, where)


def compute_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int, greedy: bool = False):
    """Top-k of each row plus the given token (first), with 1-based ranks: as vLLM, a token's rank counts the
    tokens at least as likely, itself included (a tie ranks after its equals). `greedy`: every given token is
    its row's first maximum, so its rank is 1 without counting (a tie for the maximum aside)."""
    chosen = logprobs.gather(-1, token_ids.unsqueeze(-1))
    if greedy:
        chosen_rank = torch.ones_like(token_ids).unsqueeze(-1)
    else:
        chosen_rank = count_at_least(logprobs, chosen).long()
    if k > 0:
        top_vals, top_ids = top_k(logprobs, k)
        ranks = torch.arange(1, k + 1, device=logprobs.device).expand(logprobs.size(0), k)
        return (torch.cat([token_ids.unsqueeze(-1), top_ids], -1), torch.cat([chosen, top_vals], -1),
                torch.cat([chosen_rank, ranks], -1))
    return token_ids.unsqueeze(-1), chosen, chosen_rank


def count_at_least(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[B, M] (int32): how many of each row of x [B, V] are >= each of the row's M thresholds.

    A pass over the row per threshold: counted into int32 (a bool tensor's sum into int64 took 4.5x as long on a
    2-core CPU at 32 x 152k). Past a few thresholds one pass places every value among the sorted thresholds and
    counts each bucket instead (32 x 152k on that CPU: 2 thresholds 11 vs 73 ms, 8: 56 vs 131, 128: 871 vs 181)."""
    if thresholds.size(1) <= 8:
        return torch.cat([(x >= thresholds[:, j:j + 1]).sum(-1, keepdim=True, dtype=torch.int32)
                          for j in range(thresholds.size(1))], -1)
    ascending, order = thresholds.sort(-1)
    bucket = torch.searchsorted(ascending.contiguous(), x, right=True)  # how many thresholds each value reaches
    counts = torch.zeros(x.size(0), thresholds.size(1) + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(1, bucket, torch.ones_like(bucket, dtype=torch.int32))
    at_least = counts.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)[:, 1:]  # values reaching threshold j
    return torch.empty_like(at_least).scatter_(1, order, at_least)


def wanted_logprobs(logprobs: torch.Tensor, wanted_ids: torch.Tensor):
    """The logprobs of given ids ([B, M], -1 padding, whose entries are -inf) and their ranks as
    compute_logprobs counts them."""
    values = logprobs.gather(1, wanted_ids.clamp(min=0)).masked_fill(wanted_ids < 0, float("-inf"))
    return values, count_at_least(logprobs, values).long()


def seeded_draw(generator: torch.Generator) -> torch.Tensor:
    """A seeded request's draw for one step from its own generator (replayed, one per output token, when a
    preempted request resumes), so its tokens do not depend on the batch it runs in."""
    return torch.rand(1, generator=generator, device=generator.device)


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's token drawn from `probs` [B, V] by one uniform of `u` [B, 1]: the first token whose cumulative
    probability passes u (a zero-probability token never does). On a 2-core CPU at 32 x 32k: 0.6 ms, where a
    Gumbel-max draw (an exponential per token, then an argmax) took 20 ms for its random numbers alone."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(1) - 1).squeeze(1)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """vLLM's penalties on a copy of the logits, touching only the tokens they concern: repetition divides a
    seen token's positive logit (multiplies a negative one), then frequency and presence subtract per output
    occurrence and once. (Over whole rows these took ~14 ms at 32 x 32k on a 2-core CPU.)"""
    logits = logits.clone()
    if b.seen is not None:
        rows, tokens = b.seen
        values, penalty = logits[rows, tokens], b.repetition[rows]
        logits[rows, tokens] = torch.where(values > 0, values / penalty, values * penalty)
    if b.counted is not None:
        rows, tokens, counts = b.counted
        logits[rows, tokens] -= b.frequency[rows] * counts + b.presence[rows]
    return logits


def _filter(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.min_p is not None:
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * b.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if b.top_k is None and b.top_p is None:
        return logits
    # On a GPU a sort of each row costs little, and the candidates' way would wait on the host for its checks.
    return _filter_candidates(logits, b) if logits.device.type == "cpu" else _filter_sorted(logits, b)


def _filter_sorted(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, on each row sorted: a token stays while the probability before it
    is at most top_p (so the most likely always does)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if b.top_k is not None:
        position = torch.arange(logits.size(-1), device=logits.device)
        sorted_logits = sorted_logits.masked_fill(position >= b.top_k.unsqueeze(1), float("-inf"))
    if b.top_p is not None:
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # top_p 1 keeps every token (a cumulative sum in floats passes 1.0 before the tail's end)
        sorted_logits = sorted_logits.masked_fill((mass_before > b.top_p.unsqueeze(1)) & (b.top_p < 1.0).unsqueeze(1),
                                                  float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def _filter_candidates(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """`_filter`'s top-k / top-p on a CPU, without sorting whole rows where a few hundred tokens decide them (a
    sort of 32 x 32k took 80 ms on a 2-core CPU, of 32 x 152k over 300 ms: more than a decode step). The K most
    likely tokens of each row come sorted from `topk`; a row is decided within them when its top-k set fits in
    K, or (without top-k) when they hold more than top_p of its probability, so every token past them has more
    than top_p before it. K starts where that can hold: top_p needs at least top_p / (the row's largest
    probability) tokens, and grows eightfold while rows are undecided; where K would pass an eighth of the row (a
    flat distribution) the rows are sorted after all. Rows that filter nothing keep their logits whole. Same
    tokens as the sorted way, ties at the edge aside."""
    rows, vocab = logits.shape
    top_k = b.top_k if b.top_k is not None else torch.full((rows,), vocab, device=logits.device)
    no_k = top_k >= vocab
    unfiltered = no_k if b.top_p is None else no_k & (b.top_p >= 1.0)
    size = int(top_k.masked_fill(no_k, 0).max())
    if b.top_p is not None:
        full_norm = logits.logsumexp(-1, keepdim=True)
        largest = (logits.amax(-1, keepdim=True) - full_norm).exp().squeeze(1)
        needed = (b.top_p / largest).ceil().masked_fill(~no_k | unfiltered, 0)
        size = max(size, int(needed.max()))
    size = max(256, size)
    while True:
        if size > vocab // 8:
            return _filter_sorted(logits, b)
        values, ids = logits.topk(size, dim=-1)
        values = values.masked_fill(torch.arange(size) >= top_k.unsqueeze(1), float("-inf"))
        within_k = top_k <= size
        decided = unfiltered | within_k
        if b.top_p is not None:
            # probabilities over the row's top-k set (the whole row without top-k), as the sorted way has them
            norm = torch.where(within_k.unsqueeze(1), values.logsumexp(-1, keepdim=True), full_norm)
            probs = (values - norm).exp()
            values = values.masked_fill((probs.cumsum(-1) - probs > b.top_p.unsqueeze(1))
                                        & (b.top_p < 1.0).unsqueeze(1), float("-inf"))
            decided |= no_k & (probs.sum(-1) > b.top_p)
        if bool(decided.all()):
            break
        size *= 8
    kept = torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)
    return torch.where(unfiltered.unsqueeze(1), logits, kept)


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        # Unseeded requests draw from one engine-wide generator, so a run is reproducible from `seed`.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        wants_logprobs = b.max_num_logprobs >= 0 or b.wanted_ids is not None
        if b.all_greedy and not wants_logprobs and b.bias is None and b.repetition is None:
            # The model dtype's order is fp32's (the conversion is exact): no fp32 copy of the logits
            return SamplerOutput(token_ids=first_argmax(logits))
        logits = logits.float()
        raw_logprobs = logits.log_softmax(-1) if wants_logprobs else None
        if b.bias is not None:
            logits = logits + b.bias
        if b.repetition is not None:
            logits = apply_penalties(logits, b)
        greedy_ids = first_argmax(logits)
        if b.all_greedy:
            token_ids = greedy_ids
        else:
            temperature = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
            probs = _filter(logits / temperature.unsqueeze(1), b).softmax(-1)
            u = torch.rand(probs.size(0), 1, generator=self.generator, device=probs.device)
            for row, gen in (b.generators or {}).items():
                u[row] = seeded_draw(gen)
            token_ids = torch.where(b.temperature > 0, inverse_cdf_sample(probs, u), greedy_ids)
        out = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            # greedy tokens with nothing added to the logits are the maxima of the raw logprobs too
            out.logprob_token_ids, out.logprobs, out.logprob_ranks = compute_logprobs(
                raw_logprobs, token_ids, b.max_num_logprobs,
                greedy=b.all_greedy and b.bias is None and b.repetition is None)
            if b.wanted_ids is not None:
                values, ranks = wanted_logprobs(raw_logprobs, b.wanted_ids)
                out.wanted_start = out.logprob_token_ids.size(1)
                out.logprob_token_ids = torch.cat([out.logprob_token_ids, b.wanted_ids], -1)
                out.logprobs = torch.cat([out.logprobs, values], -1)
                out.logprob_ranks = torch.cat([out.logprob_ranks, ranks], -1)
        return out
