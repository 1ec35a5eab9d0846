"""Events -> integer ids per feature, with vocabularies built on the training split only.

Saved beside the model as `vocab/`: one JSON file per categorical feature (its values in id
order), for item attributes (a movie's genres) the attribute ids of every item, and the training
count of every item (`item_counts.json`: the popularity fallback for a user with no events;
vocabularies written before it lack it, see userenc/cold_start.py).
"""
from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    import torch

from userenc.events import Event
from userenc.spec import FIRST_ID, OOV_ID, PAD_ID, Feature, FeatureSpec


# The key of the event times in an encoded history (not a feature: nothing embeds it).
TIME_KEY = "_time"


def _values(event: Event, feature: Feature) -> Any:
    if feature.source == "item_id":
        return event.item_id
    if feature.source == "timestamp":
        return event.timestamp
    value = event.fields.get(feature.source)
    if feature.pattern and value is not None:
        found = re.search(feature.pattern, str(value))  # re keeps the compiled pattern cached
        return found.group(1) if found else None
    return value


_WORD = re.compile(r"[a-z0-9']+")


def gap_id(feature: Feature, seconds: int) -> int:
    """The id of a "gap" / "next_gap" time feature for a gap of `seconds` (a clock behind the
    event counts as no gap)."""
    return FIRST_ID + bisect.bisect_right(feature.boundaries, max(0, seconds))


def _as_list(value: Any, split: str = "") -> list[str]:
    if value is None:
        return []
    if split == "words":
        return _WORD.findall(str(value).lower())
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [part for part in str(value).split("|") if part]


class Vocabulary:
    """Value <-> id for one categorical feature; ids from FIRST_ID, unknown -> OOV_ID."""

    def __init__(self, values: list[str]) -> None:
        self.values = list(values)
        self.index = {v: i + FIRST_ID for i, v in enumerate(self.values)}

    @classmethod
    def build(cls, counts: Counter, max_vocab: int, min_count: int) -> "Vocabulary":
        kept = [v for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        return cls(kept[:max_vocab] if max_vocab else kept)

    def __len__(self) -> int:
        """Table size including the padding and OOV ids."""
        return FIRST_ID + len(self.values)

    def id(self, value: str) -> int:
        return self.index.get(value, OOV_ID)

    def value(self, idx: int) -> str | None:
        return self.values[idx - FIRST_ID] if idx >= FIRST_ID else None


class EventTokenizer:
    def __init__(self, spec: FeatureSpec, vocabs: dict[str, Vocabulary], item_attributes: dict[str, np.ndarray],
                 item_counts: np.ndarray | None = None) -> None:
        self.spec = spec
        self.vocabs = vocabs
        # feature name -> [item vocab size, max_values] attribute ids per item id
        self.item_attributes = item_attributes
        # Training events per item id [item vocab size] (0 for padding/OOV); None when loaded
        # from a vocabulary saved before counts were kept.
        self.item_counts = item_counts

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, spec: FeatureSpec, histories: Iterable[list[Event]]) -> "EventTokenizer":
        counters = {f.name: Counter() for f in spec.features if f.kind in ("categorical", "multi_categorical")}
        last_attr: dict[str, dict[str, list[str]]] = {f.name: {} for f in spec.features if f.item_attribute}
        for history in histories:
            for event in history:
                for f in spec.features:
                    if f.name not in counters:
                        continue
                    raw = _values(event, f)
                    vals = _as_list(raw, f.split) if f.kind == "multi_categorical" else ([str(raw)] if raw is not None else [])
                    counters[f.name].update(vals)
                    if f.item_attribute:
                        last_attr[f.name][event.item_id] = vals
        vocabs = {f.name: Vocabulary.build(counters[f.name], f.max_vocab, f.min_count) for f in spec.features if f.name in counters}
        item_vocab = vocabs[spec.item.name]
        attrs = {}
        for f in spec.features:
            if not f.item_attribute:
                continue
            width = f.max_values if f.kind == "multi_categorical" else 1
            table = np.zeros((len(item_vocab), width), dtype=np.int64)
            for item, vals in last_attr[f.name].items():
                idx = item_vocab.id(item)
                if idx != OOV_ID:
                    ids = [vocabs[f.name].id(v) for v in vals[:width]]
                    table[idx, : len(ids)] = ids
            attrs[f.name] = table
        counts = np.zeros(len(item_vocab), dtype=np.int64)
        for item, c in counters[spec.item.name].items():
            if (idx := item_vocab.id(item)) != OOV_ID:
                counts[idx] = c
        return cls(spec, vocabs, attrs, counts)

    def vocab_size(self, feature: Feature) -> int:
        return len(self.vocabs[feature.name]) if feature.name in self.vocabs else feature.fixed_size

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, history: list[Event], now: int | None = None) -> dict[str, np.ndarray]:
        """One history (timestamp order) -> {feature: int64 [T] or [T, max_values]}, and the
        events' unix times under TIME_KEY (int64 [T]: what relative-time attention biases read).
        `now`: when the next event is asked for (a recommendation's request time, an evaluation
        target's timestamp); only a "next_gap" feature reads it, for the last event."""
        n = len(history)
        out: dict[str, np.ndarray] = {TIME_KEY: np.fromiter((e.timestamp for e in history), dtype=np.int64, count=n)}
        for f in self.spec.features:
            if f.kind == "multi_categorical":
                arr = np.zeros((n, f.max_values), dtype=np.int64)
                vocab = self.vocabs[f.name]
                for t, e in enumerate(history):
                    ids = [vocab.id(v) for v in _as_list(_values(e, f), f.split)[: f.max_values]] or [OOV_ID]
                    arr[t, : len(ids)] = ids
            else:
                arr = np.fromiter((self._scalar_id(f, history, t, now) for t in range(n)), dtype=np.int64, count=n)
            out[f.name] = arr
        return out

    def _scalar_id(self, f: Feature, history: list[Event], t: int, now: int | None = None) -> int:
        e = history[t]
        if f.kind == "categorical":
            raw = _values(e, f)
            return self.vocabs[f.name].id(str(raw)) if raw is not None else OOV_ID
        if f.kind == "numeric":
            raw = _values(e, f)
            try:
                return FIRST_ID + bisect.bisect_right(f.boundaries, float(raw))
            except (TypeError, ValueError):
                return OOV_ID
        if f.part == "hour":
            return FIRST_ID + (e.timestamp // 3600) % 24
        if f.part == "weekday":
            return FIRST_ID + (e.timestamp // 86_400 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        if f.part == "date":
            return FIRST_ID + bisect.bisect_right(f.boundaries, e.timestamp)
        if f.part == "next_gap":
            following = history[t + 1].timestamp if t + 1 < len(history) else now
            if following is None:
                return OOV_ID  # the last event, and no request time given
            return gap_id(f, following - e.timestamp)
        if t == 0:
            return OOV_ID  # no previous event: the gap is unknown
        return gap_id(f, e.timestamp - history[t - 1].timestamp)

    # --- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").write_text(json.dumps(self.spec.to_dict(), indent=1))
        for name, vocab in self.vocabs.items():
            (folder / f"{name}.json").write_text(json.dumps({"values": vocab.values}))
        for name, table in self.item_attributes.items():
            (folder / f"item_{name}.json").write_text(json.dumps(table.tolist()))
        if self.item_counts is not None:
            (folder / "item_counts.json").write_text(json.dumps(self.item_counts.tolist()))

    @classmethod
    def load(cls, folder: str | Path) -> "EventTokenizer":
        folder = Path(folder)
        if not (folder / "spec.json").is_file():
            raise FileNotFoundError(f"{folder} holds no vocabulary (spec.json missing)")
        spec = FeatureSpec.from_dict(json.loads((folder / "spec.json").read_text()))
        vocabs = {}
        attrs = {}
        for f in spec.features:
            if f.kind in ("categorical", "multi_categorical"):
                vocabs[f.name] = Vocabulary(json.loads((folder / f"{f.name}.json").read_text())["values"])
            if f.item_attribute:
                attrs[f.name] = np.asarray(json.loads((folder / f"item_{f.name}.json").read_text()), dtype=np.int64)
        counts_file = folder / "item_counts.json"
        counts = np.asarray(json.loads(counts_file.read_text()), dtype=np.int64) if counts_file.is_file() else None
        if counts is not None and len(counts) != len(vocabs[spec.item.name]):
            raise ValueError(f"{counts_file}: {len(counts)} counts for {len(vocabs[spec.item.name])} item ids")
        return cls(spec, vocabs, attrs, counts)


def left_pad_tensors(batch: list[dict[str, np.ndarray]], spec: FeatureSpec, max_len: int, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`left_pad`, as tensors on `device`: what the encoder takes (torch loads only when called)."""
    import torch

    ids, valid = left_pad(batch, spec, max_len)
    return {k: torch.from_numpy(v).to(device) for k, v in ids.items()}, torch.from_numpy(valid).to(device)


def left_pad(batch: list[dict[str, np.ndarray]], spec: FeatureSpec, max_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Left-truncate each sequence to its last max_len events and left-pad to a common length.

    Returns ids per feature (and the times, when encoded) [B, T(, V)] and a bool mask [B, T]
    (True = real event)."""
    assert batch, "empty batch"
    lengths = [min(len(next(iter(x.values()))), max_len) for x in batch]
    width = max(max(lengths), 1)
    out: dict[str, np.ndarray] = {}
    keys = [f.name for f in spec.features] + ([TIME_KEY] if TIME_KEY in batch[0] else [])
    for key in keys:
        sample = batch[0][key]
        arr = np.full((len(batch), width) + sample.shape[1:], PAD_ID, dtype=np.int64)
        for b, (x, n) in enumerate(zip(batch, lengths)):
            if n:
                arr[b, width - n :] = x[key][-n:]
        out[key] = arr
    mask = np.zeros((len(batch), width), dtype=bool)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = n > 0
    return out, mask
