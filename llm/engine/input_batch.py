"""Per-request state kept on the device between steps, so a step sends only what changed.

Every running sequence holds a row (assigned at its first step, given back when it finishes,
is cancelled or preempted). A row keeps the sequence's block table, its cross block table and
user-token count, and its sampling settings. Block tables only grow while a sequence holds
its row (a prefix hit fills them at admission, the scheduler appends), so each step writes
just the new entries, all sequences in one indexed write. Host-side counters say whether any
row needs top-k, top-p, a repetition penalty, min_tokens or a seeded draw, so the sampler
skips what nobody asked for without looking at every request.
"""
from __future__ import annotations

import torch

from llm.engine.sequence import Sequence


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks: int, max_cross_blocks: int,
                 device: torch.device) -> None:
        self.device = device
        self.tables = torch.full((max_num_seqs, max_blocks), -1, dtype=torch.int32,
                                 device=device)
        self.cross_tables = torch.full((max_num_seqs, max(1, max_cross_blocks)), -1,
                                       dtype=torch.int32, device=device)
        self.cross_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        # Per row: temperature, top_k (exact in float32), top_p: one gather per step.
        self.sampling = torch.zeros(max_num_seqs, 3, dtype=torch.float32, device=device)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.rows: dict[int, Sequence] = {}
        # How many rows in use need each optional sampling stage.
        self.num_random = self.num_top_k = self.num_top_p = 0
        self.num_penalty = self.num_min_tokens = self.num_seeded = 0
        self.top_ks: dict[int, int] = {}  # row -> top_k of the sampling rows that set one
        self.version = 0  # bumped on every table write: lets readers reuse what they gathered

    @property
    def top_k_range(self) -> tuple[int, int]:
        """(narrowest, widest) top_k when every sampling row sets one, else (0, 0)."""
        if not self.num_random or len(self.top_ks) < self.num_random:
            return 0, 0
        return min(self.top_ks.values()), max(self.top_ks.values())

    def _count(self, seq: Sequence, sign: int) -> None:
        p = seq.sampling
        self.num_random += sign * (not p.greedy)
        self.num_top_k += sign * (p.top_k > 0 and not p.greedy)
        self.num_top_p += sign * (p.top_p < 1.0 and not p.greedy)
        self.num_penalty += sign * (p.repetition_penalty != 1.0)
        self.num_min_tokens += sign * (p.min_tokens > 0)
        self.num_seeded += sign * (seq.seed is not None)

    def add(self, seq: Sequence) -> None:
        assert seq.row < 0, "a sequence holds one row"
        row = seq.row = self.free_rows.pop()
        self.rows[row] = seq
        seq.num_synced_blocks = 0
        p = seq.sampling
        self.sampling[row] = torch.tensor([p.temperature, p.top_k, p.top_p])
        if seq.cross_block_table:
            n = len(seq.cross_block_table)
            self.cross_tables[row, :n] = torch.tensor(seq.cross_block_table, dtype=torch.int32)
        self.cross_lens[row] = seq.num_cross_tokens
        if p.top_k > 0 and not p.greedy:
            self.top_ks[row] = p.top_k
        self._count(seq, 1)
        self.version += 1

    def release(self, seq: Sequence) -> None:
        """Give the row back (finished, cancelled, preempted); no-op without one."""
        if seq.row < 0:
            return
        row, seq.row = seq.row, -1
        del self.rows[row]
        self.free_rows.append(row)
        self.tables[row].fill_(-1)
        self.cross_tables[row].fill_(-1)
        self.cross_lens[row] = 0
        self.top_ks.pop(row, None)
        self._count(seq, -1)
        self.version += 1

    def sync(self, seqs: list[Sequence]) -> None:
        """Rows for newcomers; block-table entries added since the last step, in one write."""
        r, c, v = [], [], []
        for seq in seqs:
            if seq.row < 0:
                self.add(seq)
            table = seq.block_table
            done = seq.num_synced_blocks
            if len(table) > done:
                new = table[done:]
                r.extend([seq.row] * len(new))
                c.extend(range(done, len(table)))
                v.extend(new)
                seq.num_synced_blocks = len(table)
        if v:
            self.version += 1
            idx = torch.tensor([r, c], dtype=torch.long).to(self.device, non_blocking=True)
            self.tables.index_put_((idx[0], idx[1]),
                                   torch.tensor(v, dtype=torch.int32).to(self.device))
