"""Block bookkeeping for the paged KV cache: which pool blocks each sequence owns, reference
counts, and the prefix cache.

Prefix cache: every FULL self-attention block gets a hash that chains the previous block's hash
with this block's token ids; the chain starts at the request's salt (a hash of its user tokens'
bytes, or a fixed salt for "no user tokens"). With cross-attention the K/V of a token depend on the
user, so the salt keeps two users from ever sharing a block, while the same user with the same
prefix does. Freed blocks keep their hash and stay findable until the pool hands them out again
(least recently freed first), so a finished or preempted request's prefix can still be hit.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

NO_USER_SALT = b"userllm/no-user-tokens"


def user_salt(user_tokens: torch.Tensor | None) -> bytes:
    """A digest of the user tokens' exact bytes (dtype and shape included)."""
    if user_tokens is None:
        return NO_USER_SALT
    t = user_tokens.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def chain_hash(previous: bytes, token_ids) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None  # checked on a hit: no silent collisions


class BlockPool:
    """A free list over `num_blocks` ids. The order is eviction order: blocks without a cached
    hash are handed out first, then cached ones least recently freed first."""

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.ref_count = 1
        return block

    def revive(self, block: Block) -> None:
        """A prefix hit: one more user of `block` (off the free list if nobody held it)."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> bool:
        """One user fewer; True when the block went back to the free list."""
        assert block.ref_count > 0, f"double free of block {block.block_id}"
        block.ref_count -= 1
        if block.ref_count:
            return False
        self._free[block.block_id] = None
        if block.hash is None:  # nothing worth keeping: hand it out before cached blocks
            self._free.move_to_end(block.block_id, last=False)
        return True


class BlockManager:
    """Self-attention blocks with a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert block_size > 0
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_to_block: dict[bytes, int] = {}
        self.num_hit_tokens = 0  # stats
        self.num_queried_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of a block nobody holds (they stay free, uncached).
        Returns how many blocks were forgotten."""
        forgotten = 0
        for block in self.pool.blocks:
            if block.ref_count == 0 and block.hash is not None:
                if self.hash_to_block.get(block.hash) == block.block_id:
                    del self.hash_to_block[block.hash]
                block.hash = block.token_ids = None
                forgotten += 1
        return forgotten

    # -- admission -------------------------------------------------------------------------
    def match_prefix(self, seq) -> int:
        """At admission of a sequence holding no blocks: take the longest chain of cached full
        blocks. At least one token is always left to compute (its logits are needed), so the
        match stops one token short of the end. Returns the number of cached tokens."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        previous = seq.salt
        hits: list[Block] = []
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(previous, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.pool.blocks[block_id].token_ids != tokens:
                break
            hits.append(self.pool.blocks[block_id])
            seq.block_hashes.append(h)
            previous = h
        for block in hits:
            self.pool.revive(block)
        seq.block_table = [b.block_id for b in hits]
        seq.num_computed_tokens = len(hits) * bs
        self.num_hit_tokens += seq.num_computed_tokens
        self.num_queried_tokens += len(seq.token_ids)
        return seq.num_computed_tokens

    # -- growth ----------------------------------------------------------------------------
    def ensure_slots(self, seq, num_new_tokens: int) -> bool:
        """Make the block table cover num_computed + num_new_tokens. False (and no change) when
        the pool has too few free blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        for _ in range(need):
            block = self.pool.take()
            if block.hash is not None:  # evicting a cached block: forget it
                if self.hash_to_block.get(block.hash) == block.block_id:
                    del self.hash_to_block[block.hash]
                block.hash = block.token_ids = None
            seq.block_table.append(block.block_id)
        return True

    def register_full_blocks(self, seq) -> None:
        """After a step wrote K/V: publish the sequence's newly completed blocks to the cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            previous = seq.block_hashes[-1] if seq.block_hashes else seq.salt
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(previous, tokens)
            seq.block_hashes.append(h)
            block = self.pool.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def free(self, seq) -> None:
        # Tail first, so a sequence's last blocks are reused before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            self.pool.release(self.pool.blocks[block_id])
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0


class CrossBlockManager:
    """Blocks for cross-attention K/V of user tokens: allocated at admission, written once at the
    first prefill chunk, freed with the request (or its preemption). No sharing."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_user_tokens: int) -> int:
        return -(-num_user_tokens // self.block_size)

    def allocate(self, seq) -> bool:
        assert not seq.cross_block_table
        need = self.blocks_needed(seq.num_cross_tokens)
        if need > self.pool.num_free:
            return False
        seq.cross_block_table = [self.pool.take().block_id for _ in range(need)]
        seq.cross_written = False
        return True

    def free(self, seq) -> None:
        for block_id in seq.cross_block_table:
            self.pool.release(self.pool.blocks[block_id])
        seq.cross_block_table = []
        seq.cross_written = False
