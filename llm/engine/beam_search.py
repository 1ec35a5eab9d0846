"""Constrained beam search and teacher-forced scoring on the model's paged path.

Answers that must come from a closed set (a catalogue's titles, 18 genre names) are decoded
with beam search constrained to a trie of their token ids, so every answer is a real one and
the top beams are a ranked list (Recall@K). It runs the same paged layers the engine serves
with (write_kv, paged prefill, the paged decode kernel, cross-attention to user tokens), on a
private pool bound for the call:

    trie = TokenTrie(token_id_lists, end_token=eos)
    ranked = BeamSearch(model, block_size=16).run(prompts, trie, beam_width=10,
                                                  user_tokens=[ut, ...])
    # ranked[i]: [(answer token ids, summed log-prob), ...] best first, at most beam_width

The prompt of each request is prefilled once; its full blocks are shared by all its beams and
each beam owns a private tail (a copy of the prompt's partial block, then its own tokens).
When a beam continues from another parent, the parent's tail blocks are copied over it: a few
blocks per step, never the prompt. Scores are summed token log-probs (the sequence's
probability under the model), so a finished answer can be compared with live beams exactly:
the search stops once no live beam can beat the worst of beam_width finished answers.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llm.context import ForwardContext, use_context
from llm.engine.kv_cache import KVCache, PoolShape


class TokenTrie:
    """Allowed continuations: every sequence ends with `end_token`, the answer's last step.

    With `log_priors` (one per sequence, e.g. a recommender's log-probability of that answer)
    and `prior_weight` w, each step also adds w * (best prior below the child - best prior
    below the node). Summed over an answer these telescope to w * (its prior - the best
    prior), so finished answers rank by model log-prob + w * prior log-prob (up to a constant
    per trie), and every step's addition stays <= 0. A prefix is scored by the best answer it
    can still reach, not by its total mass: a beam of 10 then keeps the prefixes of the
    prior's 10 best answers, where a total-mass prefix ("The ...") could crowd them out.
    """

    def __init__(self, sequences: Iterable[Sequence[int]], end_token: int,
                 log_priors: Sequence[float] | None = None, prior_weight: float = 1.0) -> None:
        self.end_token = end_token
        self.root: dict[int, dict] = {}
        self.size = 0
        self.max_length = 0  # the longest answer, its end token included
        # id(node) -> {token: the prior's weighted log step}; empty without priors.
        self.prior_steps: dict[int, dict[int, float]] = {}
        seqs = [list(map(int, seq)) for seq in sequences]
        for seq in seqs:
            assert end_token not in seq, "an answer may not contain the end token"
            node = self.root
            for tok in [*seq, end_token]:
                node = node.setdefault(tok, {})
            self.size += 1
            self.max_length = max(self.max_length, len(seq) + 1)
        if not self.size:
            raise ValueError("a trie needs at least one answer")
        if log_priors is not None:
            if len(log_priors) != len(seqs):
                raise ValueError("log_priors must give one value per sequence")
            if not prior_weight >= 0:
                raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
            self._set_priors(seqs, log_priors, prior_weight)

    def _set_priors(self, seqs: list[list[int]], log_priors: Sequence[float], w: float) -> None:
        priors = [float(x) for x in log_priors]
        if not all(math.isfinite(x) for x in priors):
            raise ValueError("log_priors must be finite")
        best: dict[int, float] = {}  # id(node) -> the best prior of an answer below it
        for seq, lp in zip(seqs, priors):
            node = self.root
            best[id(node)] = max(best.get(id(node), -math.inf), lp)
            for tok in [*seq, self.end_token]:
                node = node[tok]
                best[id(node)] = max(best.get(id(node), -math.inf), lp)
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node:
                self.prior_steps[id(node)] = {tok: w * (best[id(child)] - best[id(node)])
                                              for tok, child in node.items()}
                stack += node.values()

    def steps(self, node: dict) -> list[float] | None:
        """The prior's addition for each of `node`'s children (in its key order), or None."""
        step = self.prior_steps.get(id(node))
        return None if step is None else [step[t] for t in node]


@dataclass(slots=True)
class _Beam:
    tokens: list[int]
    score: float
    node: dict
    tail: list[int]  # private blocks


@dataclass(slots=True)
class _Request:
    prompt_len: int
    shared: list[int]  # the prompt's full blocks
    cross: list[int]
    user_len: int
    tails: list[list[int]]  # beam_width private tails; beam j of a step uses tails[j]
    start: int = 0  # prompt tokens whose K/V an earlier prompt of the call already wrote
    trie: TokenTrie | None = None
    beams: list[_Beam] = field(default_factory=list)
    finished: list[tuple[list[int], float]] = field(default_factory=list)
    done: bool = False


class BeamSearch:
    """Beam search over a model's paged path with a private pool (sized per call)."""

    def __init__(self, model: nn.Module, block_size: int = 16,
                 max_batched_tokens: int = 4096) -> None:
        self.model = model
        self.bs = block_size
        self.max_batched_tokens = max_batched_tokens
        cfg = model.config
        self.has_cross = bool(cfg.cross_layer_indices)
        self.soft_prompt = cfg.integration == "soft_prompt" and cfg.user_dim is not None
        self.dtype, self.device = model.dtype, model.device

    # -- pool --------------------------------------------------------------------------------
    def _pool(self, num_blocks: int, num_cross_blocks: int) -> KVCache:
        mc = self.model.config
        shape = PoolShape(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.bs, self.dtype)
        cross = None
        if self.has_cross:
            cross = PoolShape(len(mc.cross_layer_indices), mc.cross_heads, mc.head_dim, self.bs,
                              self.dtype)
        return KVCache(shape, num_blocks, cross, max(1, num_cross_blocks), self.device)

    def _blocks(self, n: int) -> int:
        return -(-n // self.bs)

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self, reqs: list[_Request], prompts: list[list[int]],
                 users: list[torch.Tensor | None]) -> torch.Tensor:
        """Prefill every prompt -> last-token logits [R, V]. Prompts that share a prefix with an
        earlier one (same user tokens) skip its blocks: the first wave writes them, the
        second reads them as a cached prefix. Waves are cut at max_batched_tokens."""
        logits: list[torch.Tensor | None] = [None] * len(reqs)
        for wave in ([i for i, r in enumerate(reqs) if r.start == 0],
                     [i for i, r in enumerate(reqs) if r.start > 0]):
            group: list[int] = []
            total = 0
            for i in wave + [-1]:
                size = len(prompts[i]) - reqs[i].start if i >= 0 else 0
                if group and (i < 0 or total + size > self.max_batched_tokens):
                    for j, row in zip(group, self._prefill_group(reqs, prompts, users, group)):
                        logits[j] = row
                    group, total = [], 0
                if i >= 0:
                    group.append(i)
                    total += size
        return torch.stack(logits)  # type: ignore[arg-type]

    def _prefill_group(self, reqs, prompts, users, group: list[int]) -> torch.Tensor:
        dev, bs = self.device, self.bs
        ids, pos, slots, cu, tables, soft_rows, soft_in = [], [], [], [0], [], [], []
        cross_in, cross_slots = [], []
        for i in group:
            r, p = reqs[i], prompts[i]
            table = r.shared + r.beams[0].tail
            tables.append(table)
            ids += p[r.start:]
            pos += range(r.start, len(p))
            slots += [table[j // bs] * bs + j % bs for j in range(r.start, len(p))]
            if self.soft_prompt and users[i] is not None and r.start == 0:
                soft_in.append(users[i])
                soft_rows += range(cu[-1], cu[-1] + users[i].shape[0])
            cu.append(cu[-1] + len(p) - r.start)
            if self.has_cross and users[i] is not None:
                cross_in.append(users[i])
                cross_slots += [r.cross[j // bs] * bs + j % bs for j in range(r.user_len)]
        ctx = ForwardContext(
            is_prefill=True,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            context_lens=torch.tensor([len(prompts[i]) for i in group], dtype=torch.int32,
                                      device=dev),
            block_tables=_padded(tables, dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])))
        if self.has_cross:
            self._cross_fields(ctx, [reqs[i] for i in group])
            if cross_in:
                ctx.cross_inputs = torch.cat(cross_in)
                ctx.cross_slot_mapping = torch.tensor(cross_slots, dtype=torch.int64, device=dev)
        if soft_in:
            ctx.soft_prompt_inputs = torch.cat(soft_in)
            ctx.soft_prompt_positions = torch.tensor(soft_rows, dtype=torch.int64, device=dev)
        with use_context(ctx):
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev))
        last = torch.tensor(cu[1:], device=dev) - 1
        return self.model.compute_logits(hidden[last]).float()

    def _cross_fields(self, ctx: ForwardContext, rows: list[_Request]) -> None:
        ctx.cross_block_tables = _padded([r.cross for r in rows], self.device)
        ctx.cross_lens = torch.tensor([r.user_len for r in rows], dtype=torch.int32,
                                      device=self.device)

    # -- decode ------------------------------------------------------------------------------
    def _decode(self, rows: list[tuple[_Request, _Beam]]) -> torch.Tensor:
        """Feed each beam's last token -> next-token logits [R, V]."""
        dev, bs = self.device, self.bs
        ids, pos, slots, lens, tables = [], [], [], [], []
        for r, b in rows:
            p = r.prompt_len + len(b.tokens) - 1  # position of the token being fed
            table = r.shared + b.tail
            ids.append(b.tokens[-1])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(table)
        ctx = ForwardContext(
            is_prefill=False,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=_padded(tables, dev))
        if self.has_cross:
            self._cross_fields(ctx, [r for r, _ in rows])
        with use_context(ctx):
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev))
        return self.model.compute_logits(hidden).float()

    # -- requests ----------------------------------------------------------------------------
    def _setup(self, prompts: list[list[int]], users: list[torch.Tensor | None], width: int,
               max_new: int) -> tuple[list[list[int]], list, list[_Request], KVCache]:
        """Placeholders for soft prompts, block assignment, and a pool that fits exactly."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        users = [None if u is None else u.to(self.device, self.dtype) for u in users]
        if self.soft_prompt:  # K placeholder positions in front, as the engine does
            prompts = [[0] * u.shape[0] + list(p) if u is not None else list(p)
                       for p, u in zip(prompts, users)]
        elif any(u is not None for u in users) and not self.has_cross:
            raise ValueError("user tokens given, but the model has no user-token integration")
        tail_blocks = self._blocks(self.bs - 1 + max_new)
        leaders: list[tuple[int, int]] = []
        for i in range(len(prompts)):  # only prompts written in the first wave can lead
            firsts = [j for j in range(i) if leaders[j][1] == 0]
            leaders.append(_leader(prompts, users, i, firsts, self.bs))
        need = sum(len(p) // self.bs - n for p, (_, n) in zip(prompts, leaders))
        need += len(prompts) * width * tail_blocks
        cross_need = sum(self._blocks(u.shape[0]) for u in users if u is not None)
        pool = self._pool(need, cross_need)
        free = list(range(pool.num_blocks))
        free_cross = list(range(pool.num_cross_blocks))
        reqs: list[_Request] = []
        for p, u, (lead, n) in zip(prompts, users, leaders):
            k = 0 if u is None or not self.has_cross else u.shape[0]
            cross = [free_cross.pop() for _ in range(self._blocks(k))]
            shared = reqs[lead].shared[:n] if n else []
            shared = shared + [free.pop() for _ in range(len(p) // self.bs - n)]
            tails = [[free.pop() for _ in range(tail_blocks)] for _ in range(width)]
            reqs.append(_Request(len(p), shared, cross, k, tails, start=n * self.bs))
        return prompts, users, reqs, pool

    @torch.inference_mode()
    def forced_logits(self, prompt: list[int], continuation: list[int],
                      user_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits on the paged path: the prompt's prefill, then one decode step
        per continuation token. Row t predicts continuation[t] (the last row, what follows
        it): [len(continuation) + 1, V] float32."""
        prompts, users, reqs, pool = self._setup([prompt], [user_tokens], 1,
                                                 len(continuation) + 1)
        r = reqs[0]
        beam = _Beam([], 0.0, {}, r.tails[0])
        r.beams = [beam]
        previous = _bound_pools(self.model)
        pool.bind(self.model)
        try:
            rows = [self._prefill(reqs, prompts, users)]
            for tok in continuation:
                beam.tokens.append(int(tok))
                rows.append(self._decode([(r, beam)]))
        finally:
            _restore_pools(self.model, previous)
        return torch.cat(rows)

    # -- search ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompts: list[list[int]], trie: TokenTrie | Sequence[TokenTrie],
            beam_width: int = 10, user_tokens: Sequence[torch.Tensor | None] | None = None
            ) -> list[list[tuple[list[int], float]]]:
        """Top answers per prompt: [(answer ids without the end token, log-prob)], best first.
        `trie`: one for every prompt, or one per prompt. Prompts sharing a prefix (and their
        user tokens) are prefilled once: put a user's questions in one call."""
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        users = list(user_tokens) if user_tokens is not None else [None] * len(prompts)
        tries = list(trie) if isinstance(trie, (list, tuple)) else [trie] * len(prompts)
        if len(users) != len(prompts) or len(tries) != len(prompts):
            raise ValueError("user_tokens and tries must match the prompts")
        max_new = max(t.max_length for t in tries)
        prompts, users, reqs, pool = self._setup(prompts, users, beam_width, max_new)
        for r, t in zip(reqs, tries):
            r.trie = t
            r.beams = [_Beam([], 0.0, t.root, r.tails[0])]
        previous = _bound_pools(self.model)
        pool.bind(self.model)
        try:
            logits = self._prefill(reqs, prompts, users)
            rows = [(r, r.beams[0]) for r in reqs]
            while rows:
                logp = torch.log_softmax(logits, dim=-1)
                by_req: dict[int, list[int]] = {}
                for row, (r, _) in enumerate(rows):
                    by_req.setdefault(id(r), []).append(row)
                for r in reqs:
                    if id(r) in by_req:
                        self._advance(r, [rows[i][1] for i in by_req[id(r)]],
                                      logp[by_req[id(r)]], beam_width, r.trie, pool)
                rows = [(r, b) for r in reqs if not r.done for b in r.beams]
                if rows:
                    logits = self._decode(rows)
        finally:
            _restore_pools(self.model, previous)
        return [sorted(r.finished, key=lambda a: -a[1])[:beam_width] for r in reqs]

    def _advance(self, r: _Request, beams: list[_Beam], logp: torch.Tensor, width: int,
                 trie: TokenTrie, pool: KVCache) -> None:
        cands: list[tuple[float, int, int]] = []  # (score, beam index, token)
        for i, b in enumerate(beams):
            allowed = list(b.node)
            scores = logp[i, torch.tensor(allowed, device=logp.device)].tolist()
            if (prior := trie.steps(b.node)) is not None:
                scores = [s + p for s, p in zip(scores, prior)]
            cands += [(b.score + s, i, t) for s, t in zip(scores, allowed)]
        cands.sort(key=lambda c: -c[0])
        new: list[tuple[float, int, int]] = []
        for score, i, tok in cands:
            if tok == trie.end_token:
                if len(r.finished) < width or score > r.finished[-1][1]:
                    r.finished.append((list(beams[i].tokens), score))
                    r.finished.sort(key=lambda a: -a[1])
                    del r.finished[width:]
            else:
                new.append((score, i, tok))
                if len(new) == width:
                    break
        # Log-probs (and prior steps) only add negative terms: no live beam can overtake a
        # worse finished answer.
        if not new or (len(r.finished) >= width and new[0][0] <= r.finished[-1][1]):
            r.done, r.beams = True, []
            return
        # Beam j of the next step lives in tail set j, holding a copy of its parent's tail. The
        # right-hand side of the indexed copy is gathered before anything is written, so
        # sources and destinations may overlap.
        used = self._blocks(r.prompt_len % self.bs + len(beams[0].tokens))
        src, dst, next_beams = [], [], []
        for j, (score, i, tok) in enumerate(new):
            parent, tail = beams[i], r.tails[j]
            if parent.tail is not tail:
                src += parent.tail[:used]
                dst += tail[:used]
            next_beams.append(_Beam(parent.tokens + [tok], score, parent.node[tok], tail))
        if src:
            dev = pool.kv.device
            pool.kv[:, :, torch.tensor(dst, device=dev)] = pool.kv[:, :, torch.tensor(src, device=dev)]
        r.beams = next_beams


def _leader(prompts: list[list[int]], users: list, i: int, candidates: list[int], bs: int
            ) -> tuple[int, int]:
    """(a candidate prompt, whole blocks of prompt i it already holds): the longest shared
    prefix among the candidates with the same user tokens, cut to whole blocks and one token
    short of prompt i's end (its last token must run to give logits). (i, 0): none."""
    best, best_n = i, 0
    p = prompts[i]
    for j in candidates:
        if (users[j] is None) != (users[i] is None) or (
                users[i] is not None and not torch.equal(users[j], users[i])):
            continue
        q = prompts[j]
        limit = min(len(p) - 1, len(q))
        common = next((k for k in range(limit) if p[k] != q[k]), limit)
        n = min(common // bs, len(q) // bs)
        if n > best_n:
            best, best_n = j, n
    return best, best_n


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32,
                        device=device)


def _bound_pools(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The pool views currently assigned to the model (an engine's), to put back after."""
    saved = []
    for m in model.attention_modules():
        saved += [(m, "k_cache", m.k_cache), (m, "v_cache", m.v_cache)]
    for m in model.cross_attention_modules():
        saved += [(m, "cross_k_cache", m.cross_k_cache), (m, "cross_v_cache", m.cross_v_cache)]
    return saved


def _restore_pools(model: nn.Module, saved) -> None:
    for m, name, value in saved:
        setattr(m, name, value)
