"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables, reference counts, prefix caching.

A full block's identity is the hash chain of its tokens (parent hash, its tokens), which starts from the
request's `cache_salt` (vLLM's: requests of other salts, or none, cannot find its blocks, so cannot learn by
timing what others asked) and its LoRA adapter (whose KV differs from the base model's). A freed block keeps its
hash and stays findable until it is handed out again: free blocks are reused least-recently-freed first,
so recently used prefixes survive longest.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shardserve.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions on a hit


@dataclass
class PrefixCacheStats:
    queries: int = 0   # prompt tokens looked up
    hits: int = 0      # of which found in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}              # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[int]] = {}    # hashes of the request's full blocks, in order
        self.req_num_hashed: dict[str, int] = {}      # how many of its blocks carry their hash
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    # prefix caching ----------------------------------------------------------------------------------

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs, tokens = self.block_size, request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            # a chain starts from its salt and its adapter: it matches only requests of both
            parent = hashes[-1] if hashes else (request.cache_salt, request.lora_request and
                                                request.lora_request.lora_int_id)
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_blocks(self, request: Request) -> list[int]:
        """The longest run of the request's leading full blocks already in the cache. At least one token
        is always left to compute, so the step that finishes the prompt has logits to sample from."""
        params = request.sampling_params
        if not self._cacheable(request) or params.prompt_logprobs is not None or params.skip_reading_prefix_cache:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        bs = self.block_size
        for i, h in enumerate(self._block_hashes(request, max_blocks)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                    request.all_token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        self.stats.queries += request.num_prompt_tokens
        self.stats.hits += len(hits) * bs
        return hits

    def _cacheable(self, request: Request) -> bool:
        # Prompt embeddings have placeholder ids: a hash of them would match different embeddings.
        return self.enable_prefix_caching and request.prompt_embeds is None

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self.req_num_hashed.get(request.request_id, 0)
        if num_full <= start:  # most decode steps: no block filled
            return
        blocks = self.req_blocks[request.request_id]
        hashes = self._block_hashes(request, num_full)
        bs = self.block_size
        for i in range(start, num_full):
            h, block = hashes[i], self.blocks[blocks[i]]
            if block.block_hash is None:
                block.block_hash = h
                block.token_ids = tuple(request.all_token_ids[i * bs:(i + 1) * bs])
                self.cached.setdefault(h, block.block_id)
        self.req_num_hashed[request.request_id] = num_full

    # allocation --------------------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed (or cache-hit) ones.
        Returns False, changing nothing, if the free blocks do not suffice."""
        blocks = self.req_blocks.get(request.request_id, [])
        bs = self.block_size
        num_computed = request.num_computed_tokens + len(cached_blocks) * bs
        num_needed = -(-(num_computed + num_new_tokens) // bs) - len(blocks) - len(cached_blocks)
        # Only tokens already known can be hashed: a token still being sampled (async scheduling) cannot.
        num_known = min(num_computed + num_new_tokens, len(request.all_token_ids))
        if num_needed <= 0 and not cached_blocks:  # most decode steps: the last block has room
            if self._cacheable(request):
                self._cache_full_blocks(request, num_known)
            return True
        # Cache hits that sit in the free queue stop being free when we take them.
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_needed + revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        blocks = blocks + list(cached_blocks) + [self._take_free_block() for _ in range(max(num_needed, 0))]
        self.req_blocks[request.request_id] = blocks
        if self._cacheable(request):
            # Tokens scheduled now are known, and every layer writes a step's KV before any attention of
            # that layer reads it, so a block may be shared from the step that fills it.
            self._cache_full_blocks(request, num_known)
        return True

    def fork(self, parent: Request, child: Request, num_tokens: int,
             take_over_partial: bool) -> tuple[bool, tuple[int, int] | None]:
        """Start `child`'s block table from the blocks holding `parent`'s first `num_tokens` tokens: full
        blocks shared (reference counted); a partial last block shared too if `take_over_partial` (the child
        writes the next slot in it, so only one child may), else copied into a new block. Returns (done,
        the (source, destination) copy to make or None); not done, changing nothing, if no block is free
        or the parent holds none."""
        blocks = self.req_blocks.get(parent.request_id)
        if not blocks:  # the parent gave its blocks up to make room
            return False, None
        num_full = num_tokens // self.block_size
        partial = blocks[num_full] if num_tokens % self.block_size else None
        copy = None
        if partial is not None and not take_over_partial:
            if not self.free_queue:
                return False, None
            copy = (partial, self._take_free_block())
        shared = blocks[:num_full] + ([partial] if partial is not None and copy is None else [])
        for block_id in shared:
            self.blocks[block_id].ref_count += 1
        self.req_blocks[child.request_id] = shared + ([copy[1]] if copy else [])
        self.req_hashes[child.request_id] = list(self.req_hashes.get(parent.request_id, [])[:num_full])
        self.req_num_hashed[child.request_id] = min(self.req_num_hashed.get(parent.request_id, 0), num_full)
        return True, copy

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_num_hashed.pop(request.request_id, None)
        # Tail blocks first into the queue, so a sequence's tail is evicted before its shared prefix.
        for block_id in reversed(blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (after the weights change, or between benchmark runs), if no request holds
        one; True if done (vLLM's rule)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached.clear()
        for block in self.blocks:
            block.block_hash = block.token_ids = None
        self.stats = PrefixCacheStats()
        return True

    def forget(self, request: Request) -> None:
        """Drop per-request memo (hashes) once the request is finished for good."""
        self.req_hashes.pop(request.request_id, None)
