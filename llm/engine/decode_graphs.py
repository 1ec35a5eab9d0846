"""Decode forwards over preallocated static buffers; with `bucketed`, batch sizes are rounded up
to buckets, and on CUDA each bucket is replayed from a captured CUDA graph (launch overhead
dominates a small model's decode step).

Every decode step fills the buffers' first rows with one host -> device copy (rows,
positions, token ids, slots) and takes the block tables from the persistent InputBatch with
one index_select: a handful of tensor ops whatever the batch size.
A decode group of n sequences runs in the smallest bucket b >= n. Rows n..b-1 are padding that
touches nothing: slot -1 (the KV write skips it), context_len 0 and cross_len 0 (attention
returns zeros; a cross block's MLP update is masked by cross_len > 0). The block-table widths are
fixed (max_model_len / block_size, max_user_tokens / block_size), so every kernel launch has
host-known shapes, which is what capture needs (the Triton decode kernel derives its launch
from shapes only, and the cross block skips its host-side "anyone with users?" check on CUDA).

Personalized models use the same buffers: a batch mixing users with and without user tokens
replays one graph (cross_lens 0 rows get a zero update). Soft-prompt placeholders never decode
here (they are prefilled). On CPU the buffers run eagerly: with bucketing, to test the
padding logic; without, as the CPU engine's decode path.
"""
from __future__ import annotations

import torch
from torch import nn

from llm.context import ForwardContext, use_context
from llm.engine.input_batch import InputBatch


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, inputs: InputBatch, block_size: int,
                 has_cross: bool, bucketed: bool, capture: bool) -> None:
        assert bucketed or not capture, "graphs need fixed batch sizes"
        self.model = model
        self.inputs = inputs
        self.block_size = block_size
        self.has_cross = has_cross
        b, width = inputs.tables.shape
        self.buckets = bucket_sizes(b) if bucketed else None
        dev = inputs.device
        # rows, positions, token ids, slots: one host -> device copy per step fills all four.
        self.staged = torch.zeros(4, b, dtype=torch.long, device=dev)
        self.input_ids, self.positions = self.staged[2], self.staged[1]
        self.slot_mapping = self.staged[3]
        self.slot_mapping.fill_(-1)
        self.context_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((b, width), -1, dtype=torch.int32, device=dev)
        self.cross_block_tables = torch.full_like(inputs.cross_tables, -1)
        self.cross_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._contexts: dict[int, ForwardContext] = {}
        # The rows and InputBatch version whose tables the buffers hold: a steady decode batch
        # whose tables did not grow skips the gathers.
        self._gathered: tuple[list[int], int] | None = None
        if capture:
            self._capture()

    def _context(self, b: int) -> ForwardContext:
        ctx = ForwardContext(is_prefill=False, slot_mapping=self.slot_mapping[:b],
                             context_lens=self.context_lens[:b],
                             block_tables=self.block_tables[:b])
        if self.has_cross:
            ctx.cross_block_tables = self.cross_block_tables[:b]
            ctx.cross_lens = self.cross_lens[:b]
        return ctx

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            ctx = self._context(b)
            with use_context(ctx):  # warm-up: compiles kernels; padding rows write nothing
                self.model(self.input_ids[:b], self.positions[:b])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), use_context(self._context(b)):
                self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b])
            pool = graph.pool()
            self.graphs[b] = graph

    def prepare(self, seqs) -> int:
        """Fill the buffers for the n decoding sequences (each holds an InputBatch row whose
        block table covers its new token); returns the bucket size to run."""
        n = len(seqs)
        b = n if self.buckets is None else next(size for size in self.buckets if size >= n)
        bs = self.block_size
        pos = [s.num_computed_tokens for s in seqs]
        rows = [s.row for s in seqs]
        # The slots are a lookup in lists the host holds anyway: cheaper than a device gather
        # (a few tensor ops cost more than this at any batch size the engine runs).
        host = torch.tensor([rows, pos, [s.token_ids[p] for s, p in zip(seqs, pos)],
                             [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]],
                            dtype=torch.long)
        self.staged[:, :n].copy_(host, non_blocking=True)
        torch.add(self.positions[:n], 1, out=self.context_lens[:n])
        if self._gathered != (rows, self.inputs.version):
            self._gathered = (rows, self.inputs.version)
            idx = self.staged[0, :n]
            torch.index_select(self.inputs.tables, 0, idx, out=self.block_tables[:n])
            if self.has_cross:
                torch.index_select(self.inputs.cross_tables, 0, idx,
                                   out=self.cross_block_tables[:n])
                torch.index_select(self.inputs.cross_lens, 0, idx, out=self.cross_lens[:n])
        if b > n:  # padding rows: write nothing, attend to nothing
            self.slot_mapping[n:b] = -1
            self.context_lens[n:b] = 0
            self.cross_lens[n:b] = 0
        return b

    def run(self, b: int, n: int) -> torch.Tensor:
        """Hidden states [n, hidden] of the sequences prepare() filled in."""
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        ctx = self._contexts.get(b)
        if ctx is None:
            ctx = self._contexts[b] = self._context(b)
        ctx.plans = {}  # gather plans hold this step's tables
        with use_context(ctx):
            return self.model(self.input_ids[:b], self.positions[:b])[:n]
