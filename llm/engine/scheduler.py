"""Continuous batching with a decode-first token budget, chunked prefill and preemption.

Each step the scheduler picks, in this order, until the token budget (max_num_batched_tokens) is
spent: every running sequence that is decoding (one token each), then running sequences still in
their prefill (one chunk each), then waiting sequences (prefix-cache lookup, cross blocks, first
chunk) while fewer than max_num_seqs run. When the pool has no block for a running sequence, the
most recently arrived running sequence is preempted by recompute: its self and cross blocks are
freed and it goes back to the head of the waiting queue with prompt + output so far as its new
prompt (generated output is kept).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llm.engine.block_manager import BlockManager, CrossBlockManager
from llm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, cross_manager: CrossBlockManager | None,
                 max_num_seqs: int, max_num_batched_tokens: int) -> None:
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1
        self.blocks = block_manager
        self.cross = cross_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or cancelled) and give back all its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if self.cross is not None and seq.cross_block_table:
            self.cross.free(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1) decodes first, then 2) unfinished prefills of running sequences.
        decoding, prefilling = [], []
        for s in self.running:
            left = len(s.token_ids) - s.num_computed_tokens
            if left == 1:
                decoding.append(s)
            elif left > 1:
                prefilling.append(s)
        bs = self.blocks.block_size
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if seq.num_computed_tokens + n <= len(seq.block_table) * bs:  # room already
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                continue
            while not self.blocks.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        # A victim may have been scheduled before it was preempted: drop it from the batch.
        if batch.preempted:
            keep = [i for i, s in enumerate(batch.seqs) if s.status is SequenceStatus.RUNNING]
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.num_new_tokens = [batch.num_new_tokens[i] for i in keep]
            budget = self.max_num_batched_tokens - batch.num_tokens
        # 3) admissions, oldest first; a sequence preempted in this step waits for the next.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq in batch.preempted:
                break
            if not self._admit(seq, budget, batch):
                break
            budget = self.max_num_batched_tokens - batch.num_tokens
        return batch

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> bool:
        if self.cross is not None and seq.num_cross_tokens and not self.cross.allocate(seq):
            return False
        self.blocks.match_prefix(seq)
        seq.num_cached_tokens = seq.num_computed_tokens
        n = min(len(seq) - seq.num_computed_tokens, budget)
        if not self.blocks.ensure_slots(seq, n):
            self._free(seq)
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        return True
