"""Turns a scheduled batch into one forward pass over a flat token stream and samples.

A step's sequences are split in two groups, each one forward over a flat [N] stream of new
tokens: decodes (one token appended to an existing cache, no cross K/V pending) run the decode
path (static buffers filled on the device from the persistent InputBatch, CUDA graphs on CUDA);
prefill chunks (first chunk, later chunks after a cached prefix, recompute after preemption)
run the prefill path, which attends over cached prefix + new tokens. The ForwardContext tells
the attention layers where each token's K/V goes and which blocks each sequence reads. Logits
are computed only for the last token of each sequence that samples this step, and sampled on
the device for the whole group at once (llm/engine/batch_sampler.py).
"""
from __future__ import annotations

import torch
from torch import nn

from llm.context import ForwardContext, use_context
from llm.engine.batch_sampler import SamplingBatch, sample, step_key
from llm.engine.decode_graphs import DecodeGraphRunner
from llm.engine.input_batch import InputBatch
from llm.engine.sampler import apply_repetition_penalty
from llm.engine.scheduler import ScheduledBatch
from llm.engine.step_profile import StepProfile


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device,
                 inputs: InputBatch, decode: DecodeGraphRunner, has_cross: bool,
                 soft_prompt: bool = False, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_size = block_size
        self.device = device
        self.has_cross = has_cross
        self.soft_prompt = soft_prompt
        self.inputs = inputs
        self.decode_graphs = decode
        # Noise for requests without a seed (seeded ones hash theirs).
        self.generator = torch.Generator(device=device)
        self.generator.seed()
        self.profile = StepProfile()  # the engine shares its own

    def prepare(self, seqs, nums) -> tuple[torch.Tensor, torch.Tensor, ForwardContext,
                                          list[int]]:
        """Prefill-path inputs. Token ids come from the host lists; positions, slots and
        block tables are tensor ops over the InputBatch rows."""
        bs = self.block_size
        input_ids: list[int] = []
        cu = [0]
        last_rows: list[int] = []  # row in the flat stream of each sampling sequence's last token
        cross_inputs: list[torch.Tensor] = []
        cross_slots: list[int] = []
        soft_inputs: list[torch.Tensor] = []
        soft_rows: list[int] = []
        decode_only = True
        for seq, n in zip(seqs, nums):
            start = seq.num_computed_tokens
            end = start + n
            assert end <= len(seq) and len(seq.block_table) * bs >= end
            input_ids.extend(seq.token_ids[start:end])
            cu.append(cu[-1] + n)
            if end == len(seq):
                last_rows.append(cu[-1] - 1)
            if seq.cross_block_table and not seq.cross_written:
                cross_inputs.append(seq.user_tokens)
                cross_slots.extend(seq.cross_block_table[p // bs] * bs + p % bs
                                   for p in range(seq.num_cross_tokens))
            if start < seq.num_soft_tokens:  # soft-prompt placeholders in this chunk
                stop = min(end, seq.num_soft_tokens)
                soft_inputs.append(seq.user_tokens[start:stop])
                soft_rows.extend(range(cu[-2], cu[-2] + stop - start))
            decode_only &= n == 1 and start > 0
        dev = self.device
        host = torch.tensor([[s.row for s in seqs], [s.num_computed_tokens for s in seqs],
                             list(nums)], dtype=torch.long)
        rows, starts, lens = host.to(dev).unbind(0)
        cu_q = torch.tensor(cu, dtype=torch.int32).to(dev)
        seq_of = torch.repeat_interleave(torch.arange(len(seqs), device=dev), lens)
        pos = starts[seq_of] + torch.arange(seq_of.numel(), device=dev) - cu_q[:-1][seq_of]
        tables = self.inputs.tables.index_select(0, rows)
        slots = tables[seq_of, torch.div(pos, bs, rounding_mode="floor")].long() * bs + pos % bs
        ctx = ForwardContext(
            is_prefill=not decode_only or bool(cross_inputs), slot_mapping=slots,
            context_lens=(starts + lens).to(torch.int32), block_tables=tables,
            cu_seqlens_q=cu_q, max_seqlen_q=max(nums))
        if self.has_cross:
            ctx.cross_block_tables = self.inputs.cross_tables.index_select(0, rows)
            ctx.cross_lens = self.inputs.cross_lens.index_select(0, rows)
            if cross_inputs:
                ctx.cross_inputs = torch.cat(cross_inputs)
                ctx.cross_slot_mapping = torch.tensor(cross_slots, dtype=torch.int64).to(dev)
        if soft_inputs:
            ctx.soft_prompt_inputs = torch.cat(soft_inputs)
            ctx.soft_prompt_positions = torch.tensor(soft_rows, dtype=torch.int64).to(dev)
        ids = torch.tensor(input_ids, dtype=torch.long).to(dev)
        return ids, pos, ctx, last_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Forward + sampling; returns the sampled token per scheduled sequence (None for a
        sequence whose prefill is not complete after this step).

        Decodes and prefill chunks of one step run as two forwards: the prefill path pads every
        sequence's queries to the longest chunk, so a decode (one query) riding along a long
        chunk would pay for that chunk's length."""
        seqs, nums = batch.seqs, batch.num_new_tokens
        self.inputs.sync(seqs)
        # A decode: one token after a cache, no cross K/V left to write.
        decode = [n == 1 and s.num_computed_tokens > 0
                  and (s.cross_written or not s.cross_block_table) for s, n in zip(seqs, nums)]
        if all(decode) or not any(decode):
            return self._run_group(seqs, nums, decode[0])
        result: list[int | None] = [None] * len(seqs)
        for want in (True, False):
            idx = [i for i, d in enumerate(decode) if d is want]
            tokens = self._run_group([seqs[i] for i in idx], [nums[i] for i in idx], want)
            for i, tok in zip(idx, tokens):
                result[i] = tok
        return result

    def _run_group(self, seqs, nums, is_decode: bool) -> list[int | None]:
        prof = self.profile
        t0 = prof.clock()
        if is_decode and not (self.soft_prompt and any(
                s.num_computed_tokens < s.num_soft_tokens for s in seqs)):
            b = self.decode_graphs.prepare(seqs)
            t1 = prof.clock()
            hidden = self.decode_graphs.run(b, len(seqs))  # one row per sequence
            last_rows = None
        else:
            ids, pos, ctx, last_rows = self.prepare(seqs, nums)
            t1 = prof.clock()
            with use_context(ctx):
                hidden = self.model(ids, pos)
        prof.prepare += t1 - t0
        samples = [s.num_computed_tokens + n == len(s) for s, n in zip(seqs, nums)]
        if not any(samples):
            prof.forward += prof.clock() - t1
            return [None] * len(seqs)
        if last_rows is None and not all(samples):  # a one-token prefill chunk rode along
            last_rows = [i for i, ok in enumerate(samples) if ok]
        if last_rows is not None:
            hidden = hidden[torch.tensor(last_rows, device=hidden.device)]
        logits = self.model.compute_logits(hidden)
        t2 = prof.clock()
        prof.forward += t2 - t1
        sampling = [s for s, ok in zip(seqs, samples) if ok]
        tokens = self._sample(logits, sampling)
        prof.sample += prof.clock() - t2
        if len(sampling) == len(seqs):
            return tokens
        it = iter(tokens)
        return [next(it) if ok else None for ok in samples]

    def _sample(self, logits: torch.Tensor, seqs) -> list[int]:
        ib = self.inputs
        if ib.num_min_tokens:  # no eos / stop token before min_tokens outputs: one write
            rows, banned = [], []
            for row, s in enumerate(seqs):
                if s.num_output_tokens < s.sampling.min_tokens:
                    ids = self.eos_token_ids + s.sampling.stop_token_ids
                    rows.extend([row] * len(ids))
                    banned.extend(ids)
            if banned:
                idx = torch.tensor([rows, banned], dtype=torch.long).to(logits.device)
                logits[idx[0], idx[1]] = float("-inf")
        if ib.num_penalty:
            penalties = [s.sampling.repetition_penalty for s in seqs]
            logits = apply_repetition_penalty(
                logits.float(), [s.token_ids if p != 1.0 else [] for s, p in zip(seqs, penalties)],
                penalties)
        if not ib.num_random:
            return logits.argmax(dim=-1).tolist()
        rows = torch.tensor([s.row for s in seqs], dtype=torch.long).to(self.device)
        t, k, p = ib.sampling.index_select(0, rows).unbind(1)
        seeded = ([(i, step_key(s.seed, s.num_output_tokens))
                   for i, s in enumerate(seqs) if s.seed is not None] if ib.num_seeded else [])
        narrowest, candidates = ib.top_k_range
        batch = SamplingBatch(t, k, p, True, ib.num_top_k > 0, ib.num_top_p > 0, seeded,
                              candidates=candidates, all_random=ib.num_random == len(ib.rows),
                              top_k_is_width=candidates > 0 and narrowest == candidates)
        return sample(logits, batch, self.generator).tolist()
