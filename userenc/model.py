"""The user encoder: feature embeddings -> fusion -> causal transformer -> per-position states,
next-event heads for training, and a projection (optionally through a Perceiver resampler) to the
user tokens an LLM reads.

    model = UserEncoder(spec, cfg, tokenizer.item_attributes)
    tokens, mask = model.encode(batch_ids, valid)        # [B, K or T, out_dim]
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from userenc.config import EncoderConfig
from userenc.fusion import EarlyFusion, LateFusion
from userenc.heads import NextEventHeads, last_seen_index
from userenc.item_hints import ItemHints
from userenc.layers import CausalTransformer
from userenc.objectives import FutureGenreHead, all_action_loss
from userenc.perceiver import PerceiverResampler
from userenc.spec import FeatureSpec
from userenc.tokenize import TIME_KEY


def positions_from_left(valid: torch.Tensor) -> torch.Tensor:
    """Position 0 at each sequence's first real event, so left padding changes nothing."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


class UserEncoder(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: EncoderConfig, item_attributes: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        missing = [f.name for f in spec.features if f.name not in cfg.vocab_sizes]
        assert not missing, f"vocab_sizes lacks {missing}"
        self.spec, self.cfg = spec, cfg
        rope = cfg.positions == "rope"
        attrs = {k: torch.as_tensor(v) for k, v in (item_attributes or {}).items()}

        def transformer() -> CausalTransformer:
            return CausalTransformer(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout, rope,
                                     cfg.time_bias_buckets)

        if cfg.fusion == "early":
            self.fusion = EarlyFusion(spec, cfg.vocab_sizes, cfg.d_model, cfg.dropout,
                                      cfg.feature_dropout)
            self.encoder = transformer()
        else:
            per_feature = nn.ModuleDict({f.name: transformer() for f in spec.features})
            self.fusion = LateFusion(spec, cfg.vocab_sizes, cfg.d_model, cfg.dropout, per_feature)
            self.encoder = None
        self.learned_pos = None if rope else nn.Embedding(cfg.max_len, cfg.d_model)
        self.heads = NextEventHeads(spec, cfg, attrs)
        # Tie the ranking side to the input side (as SASRec does): an item's input and candidate
        # embeddings are one table, and so are its attributes', so each learns from both roles.
        embeds = self.fusion.embed
        self.heads.candidates.item.weight = embeds[spec.item.name].table.weight
        for name, attr in self.heads.candidates.attr_embed.items():
            attr.table.weight = embeds[name].table.weight
        self.resampler = (
            PerceiverResampler(cfg.d_model, cfg.num_user_tokens, cfg.perceiver_layers, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
            if cfg.num_user_tokens
            else None
        )
        self.proj = nn.Linear(cfg.d_model, cfg.out_dim)
        self.hints = (ItemHints(cfg.vocab_sizes[spec.item.name], cfg.out_dim, cfg.item_hints)
                      if cfg.item_hints else None)
        # Built only when trained: a next-event model's weights stay exactly today's.
        self.future_genres = None
        if cfg.future_genre_weight > 0:
            genre = next((f for f in spec.features if f.name == cfg.future_genre_feature), None)
            if genre is None or genre.kind != "multi_categorical":
                raise ValueError(f"the future-genre objective needs a multi_categorical feature "
                                 f"{cfg.future_genre_feature!r} in spec {spec.name!r}")
            self.future_genres = FutureGenreHead(cfg.d_model, cfg.vocab_sizes[genre.name])
        self.apply(self._init)
        if self.encoder is not None and self.encoder.time_bias is not None:
            for table in self.encoder.time_bias:  # no bias at first: attention starts as without it
                nn.init.zeros_(table.weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # Variance-preserving: these layers are narrow (d_model 64), where GPT's fixed 0.02 shrinks
        # the item signal through the fusion MLP until the encoder only learns popularity.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.embedding_dim**-0.5)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()

    def states(self, ids: dict[str, torch.Tensor], valid: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Per-position user states [B, T, d_model]; state t has seen events 0..t only.
        With last_only, only the latest state [B, 1, d_model] (cheaper: one query in the last block)."""
        assert valid.shape[1] <= self.cfg.max_len, f"sequence of {valid.shape[1]} exceeds max_len {self.cfg.max_len}"
        pos = positions_from_left(valid)
        if self.encoder is None:
            states = self.fusion(ids, valid, pos, self.learned_pos(pos) if self.learned_pos is not None else None)
            return states[:, -1:] if last_only else states
        x = self.fusion(ids)
        if self.learned_pos is not None:
            x = x + self.learned_pos(pos)
        return self.encoder(x, valid, pos, last_only, ids.get(TIME_KEY))

    @torch.inference_mode()
    def next_item_scores(self, ids: dict[str, torch.Tensor], valid: torch.Tensor,
                         catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """Each history's next-item scores over the catalogue [B, num_items] (left padding), the
        seen bias, if trained, on the history's items. `catalogue`: the candidate tower's output,
        when the caller keeps it."""
        states = self.states(ids, valid, last_only=True)[:, -1]
        seen = None
        if self.heads.seen_bias is not None:
            seen = last_seen_index(ids[self.spec.item.name], self.heads.candidates.item.num_embeddings)
        return self.heads.item_scores(states, catalogue, seen=seen)

    def user_tokens(self, states: torch.Tensor, valid: torch.Tensor,
                    ids: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected user tokens: [B, K, out_dim] through the resampler, else [B, T, out_dim];
        with item hints, M more after them (the history's items, from `ids`, left out)."""
        if self.resampler is not None:
            tokens = self.proj(self.resampler(states, valid))
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        else:
            tokens, mask = self.proj(states), valid
        if self.hints is None:
            return tokens, mask
        assert ids is not None, "item hints leave the history's items out: pass its ids"
        hints = self.hints(self.hinted_items(states, valid, ids))
        hint_mask = torch.ones(hints.shape[:2], dtype=torch.bool, device=mask.device)
        return torch.cat([tokens, hints.to(tokens.dtype)], 1), torch.cat([mask, hint_mask], 1)

    def hinted_items(self, states: torch.Tensor, valid: torch.Tensor,
                     ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """The item ids [B, M] the hints hold: the next-item head's best from each latest state
        (left padding: the last position), the history's own items left out."""
        assert self.hints is not None, "the encoder was built without item hints"
        scores = self.heads.item_scores(states[:, -1])
        return self.hints.choose(scores, ids[self.spec.item.name], valid)

    @torch.inference_mode()
    def encode(self, ids: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch inference: ([B, K or T, out_dim], mask [B, K or T])."""
        if not bool(valid.any(dim=1).all()):
            raise ValueError("every history to encode needs at least one event")
        return self.user_tokens(self.states(ids, valid), valid, ids)

    @torch.inference_mode()
    def user_embedding(self, ids: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """One vector per user [B, out_dim]: the projection of the latest state, the one trained
        to predict the user's next event -- what the store indexes for similar-user search.
        (The resampler's K tokens are for the LLM; their mean is not a good similarity key.)"""
        if not bool(valid.any(dim=1).all()):
            raise ValueError("every history to encode needs at least one event")
        # Left padding: the last position is each user's latest event.
        return self.proj(self.states(ids, valid, last_only=True)[:, -1])

    def training_loss(self, ids: dict[str, torch.Tensor], valid: torch.Tensor,
                      report: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured mix of objectives (userenc/objectives.py) on one batch; with the
        default weights exactly next_event_loss."""
        cfg = self.cfg
        states = self.states(ids, valid)
        total, parts = states.new_zeros(()), {}
        if cfg.next_event_weight > 0:
            loss, parts = self.next_event_loss(ids, valid, states, report)
            total = total + cfg.next_event_weight * loss if cfg.next_event_weight != 1.0 else loss
        if cfg.all_action_weight > 0:
            loss = all_action_loss(self.heads, states, ids[self.spec.item.name], valid, cfg.future_window, cfg.num_negatives)
            if report:
                parts["all_action"] = float(loss.detach())
            total = total + cfg.all_action_weight * loss
        if self.future_genres is not None:
            loss = self.future_genres.loss(states, ids[cfg.future_genre_feature], valid, cfg.future_window)
            if report:
                parts["future_genres"] = float(loss.detach())
            total = total + cfg.future_genre_weight * loss
        return total, parts

    def next_event_loss(self, ids: dict[str, torch.Tensor], valid: torch.Tensor,
                        states: torch.Tensor | None = None, report: bool = True
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher-forced next-event loss: state t predicts event t+1, for every real pair."""
        states = self.states(ids, valid) if states is None else states
        inputs = states[:, :-1]
        targets = {name: x[:, 1:] for name, x in ids.items()}
        pair_valid = valid[:, :-1] & valid[:, 1:]
        loss, parts = self.heads.loss(inputs, targets, pair_valid, ids[self.spec.item.name][:, :-1], report)
        if self.resampler is not None:
            # The resampler learns from the same objective: its pooled tokens, reading the history
            # up to the second-to-last event, predict the last one.
            prefix_valid = valid.clone()
            prefix_valid[:, -1] = False
            usable = prefix_valid.any(dim=1)
            pooled = self.resampler(states[usable], prefix_valid[usable]).mean(dim=1)
            last = {name: x[usable, -1:] for name, x in ids.items()}
            aux, _ = self.heads.loss(pooled[:, None], last, torch.ones(len(pooled), 1, dtype=torch.bool, device=valid.device),
                                     report=False)
            if report:
                parts["resampler"] = float(aux.detach())
            loss = loss + aux
        return loss, parts
