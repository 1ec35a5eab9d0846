"""Turns a scheduled batch into one forward pass over a flat token stream and samples.

A step's sequences are split in two groups, each one forward over a flat [N] stream of new
tokens: decodes (one token appended to an existing cache, no cross K/V pending) run the decode
path (the paged decode kernel); prefill chunks (first chunk, later chunks after a cached prefix,
recompute after preemption) run the prefill path, which attends over cached prefix + new
tokens. The ForwardContext tells the attention layers where each token's K/V goes and which
blocks each sequence reads. Logits are computed only for the last token of each sequence that
samples this step.
"""
from __future__ import annotations


import torch
from torch import nn

from llm.context import ForwardContext, use_context
from llm.engine.decode_graphs import DecodeGraphRunner
from llm.engine.sampler import Sampler
from llm.engine.scheduler import ScheduledBatch
from llm.engine.step_profile import StepProfile


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return out.to(device)


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device,
                 has_cross: bool, decode_graphs: DecodeGraphRunner | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_size = block_size
        self.device = device
        self.has_cross = has_cross
        self.sampler = Sampler()
        # Static decode buffers / CUDA graphs (models without cross blocks only, see there).
        assert decode_graphs is None or not has_cross
        self.decode_graphs = decode_graphs
        self.profile = StepProfile()  # the engine shares its own

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, ForwardContext,
                                                       list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu = [0]
        last_rows: list[int] = []  # row in the flat stream of each sampling sequence's last token
        cross_inputs: list[torch.Tensor] = []
        cross_slots: list[int] = []
        soft_inputs: list[torch.Tensor] = []
        soft_rows: list[int] = []
        decode_only = True
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            assert end <= len(seq) and len(seq.block_table) * bs >= end
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            cu.append(cu[-1] + n)
            if end == len(seq):
                last_rows.append(cu[-1] - 1)
            if seq.num_cross_tokens and not seq.cross_written:
                cross_inputs.append(seq.user_tokens)
                cross_slots.extend(seq.cross_block_table[p // bs] * bs + p % bs
                                   for p in range(seq.num_cross_tokens))
            if start < seq.num_soft_tokens:  # soft-prompt placeholders in this chunk
                stop = min(end, seq.num_soft_tokens)
                soft_inputs.append(seq.user_tokens[start:stop])
                soft_rows.extend(range(cu[-2], cu[-2] + stop - start))
            decode_only &= n == 1 and start > 0
        dev = self.device
        ctx = ForwardContext(
            is_prefill=not decode_only or bool(cross_inputs),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev),
            block_tables=_padded([s.block_table for s in batch.seqs], dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(dev),
        )
        if self.has_cross:
            ctx.cross_block_tables = _padded([s.cross_block_table for s in batch.seqs], dev)
            ctx.cross_lens = torch.tensor([s.num_cross_tokens for s in batch.seqs],
                                          dtype=torch.int32).to(dev)
            if cross_inputs:
                ctx.cross_inputs = torch.cat(cross_inputs)
                ctx.cross_slot_mapping = torch.tensor(cross_slots, dtype=torch.int64).to(dev)
        if soft_inputs:
            ctx.soft_prompt_inputs = torch.cat(soft_inputs)
            ctx.soft_prompt_positions = torch.tensor(soft_rows, dtype=torch.int64).to(dev)
        ids = torch.tensor(input_ids, dtype=torch.long).to(dev)
        pos = torch.tensor(positions, dtype=torch.long).to(dev)
        return ids, pos, ctx, last_rows

    @staticmethod
    def _is_decode(seq, n: int) -> bool:
        return n == 1 and seq.num_computed_tokens > 0 and not (
            seq.num_cross_tokens and not seq.cross_written)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Forward + sampling; returns the sampled token per scheduled sequence (None for a
        sequence whose prefill is not complete after this step).

        Decodes and prefill chunks of one step run as two forwards: the prefill path pads every
        sequence's queries to the longest chunk, so a decode (one query) riding along a long
        chunk would pay for that chunk's length."""
        decode = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                  if self._is_decode(s, n)]
        groups = [decode, [i for i in range(len(batch.seqs)) if i not in set(decode)]]
        result: list[int | None] = [None] * len(batch.seqs)
        for group in groups:
            if not group:
                continue
            sub = ScheduledBatch([batch.seqs[i] for i in group],
                                 [batch.num_new_tokens[i] for i in group])
            for i, tok in zip(group, self._run_group(sub, is_decode=group is decode)):
                result[i] = tok
        return result

    def _run_group(self, batch: ScheduledBatch, is_decode: bool = False) -> list[int | None]:
        prof = self.profile
        t0 = prof.clock()
        if (is_decode and self.decode_graphs is not None
                and all(s.num_computed_tokens >= s.num_soft_tokens for s in batch.seqs)):
            hidden = self.decode_graphs.run(batch.seqs)  # one row per sequence, all sample
            last_rows = list(range(len(batch.seqs)))
            t1 = t0
        else:
            ids, pos, ctx, last_rows = self.prepare(batch)
            t1 = prof.clock()
            with use_context(ctx):
                hidden = self.model(ids, pos)
        prof.prepare += t1 - t0
        sampling = [s for s, n in zip(batch.seqs, batch.num_new_tokens)
                    if s.num_computed_tokens + n == len(s)]
        if not sampling:
            prof.forward += prof.clock() - t1
            return [None] * len(batch.seqs)
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=hidden.device)])
        t2 = prof.clock()
        prof.forward += t2 - t1
        for row, s in enumerate(sampling):
            if s.num_output_tokens < s.sampling.min_tokens:  # no eos / stop token yet
                banned = list(self.eos_token_ids) + list(s.sampling.stop_token_ids)
                if banned:
                    logits[row, torch.tensor(banned, device=logits.device)] = float("-inf")
        previous = None
        if any(s.sampling.repetition_penalty != 1.0 for s in sampling):
            previous = [s.token_ids for s in sampling]
        tokens = iter(self.sampler(logits, [s.sampling for s in sampling],
                                   [s.generator for s in sampling], previous))
        prof.sample += prof.clock() - t2
        return [next(tokens) if s.num_computed_tokens + n == len(s) else None
                for s, n in zip(batch.seqs, batch.num_new_tokens)]
