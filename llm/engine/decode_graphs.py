"""Decode forwards over preallocated, batch-size-bucketed buffers; on CUDA each bucket is
replayed from a captured CUDA graph (launch overhead dominates a small model's decode step).

A decode group of n sequences runs in the smallest bucket b >= n. Rows n..b-1 are padding that
touches nothing: slot -1 (the KV write skips it), context_len 0 (decode attention returns zeros),
block-table rows of -1. The block-table width is fixed (max_model_len / block_size), so every
kernel launch has host-known shapes, which is what capture needs (the Triton decode kernel
derives its launch from shapes only).

Used for models without cross-attention blocks (their decode path checks on the host whether
any sequence has user tokens, a device sync that capture forbids) and for steps without
soft-prompt placeholders. On CPU the same buffers run eagerly (`capture=False`), which is how the
padding logic is tested without a GPU.
"""
from __future__ import annotations

import torch
from torch import nn

from llm.context import ForwardContext, use_context


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device, capture: bool) -> None:
        self.model = model
        self.block_size = block_size
        self.buckets = bucket_sizes(max_num_seqs)
        b = self.buckets[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.full((b, max_blocks_per_seq), -1, dtype=torch.int32,
                                       device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _context(self, b: int) -> ForwardContext:
        return ForwardContext(is_prefill=False, slot_mapping=self.slot_mapping[:b],
                              context_lens=self.context_lens[:b],
                              block_tables=self.block_tables[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            ctx = self._context(b)
            with use_context(ctx):  # warm-up: compiles kernels; padding rows write nothing
                self.model(self.input_ids[:b], self.positions[:b])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), use_context(ctx):
                self.outputs[b] = self.model(self.input_ids[:b], self.positions[:b])
            pool = graph.pool()
            self.graphs[b] = graph

    def run(self, seqs) -> torch.Tensor:
        """Hidden states [n, hidden] of one new token for each of the n decoding sequences."""
        n = len(seqs)
        b = next(size for size in self.buckets if size >= n)
        bs = self.block_size
        ids, pos, slots, lens = [], [], [], []
        width = self.block_tables.shape[1]
        tables = torch.full((b, width), -1, dtype=torch.int32)
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        pad = b - n
        self.input_ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor(lens + [0] * pad, dtype=torch.int32),
                                    non_blocking=True)
        self.block_tables[:b].copy_(tables, non_blocking=True)
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        with use_context(self._context(b)):
            return self.model(self.input_ids[:b], self.positions[:b])[:n]
