"""Loading a dataset for training or evaluation, and the synthetic sample data of the demo."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from userenc.events import Event, group_by_user
from userenc.readers import read_events
from userenc.spec import FeatureSpec, load_spec

DEFAULT_SPECS = {"movielens": "movielens", "amazon": "amazon", "jsonl": "generic", "csv": "generic"}


@dataclass(slots=True)
class Dataset:
    histories: dict[str, list[Event]]
    spec: FeatureSpec
    source: str
    bad_lines: int
    excluded_users: int


def load_dataset(
    path: str | Path,
    fmt: str,
    spec: str | None = None,
    skip_bad: bool = False,
    allowed: Callable[[str], bool] | None = None,
) -> Dataset:
    """Read a source, group into timestamp-ordered histories, drop users `allowed` refuses
    (erased users: tombstones)."""
    result = read_events(path, fmt, skip_bad=skip_bad)
    if not result.events:
        raise ValueError(f"{path}: no events to train on")
    histories = group_by_user(result.events)
    excluded = 0
    if allowed is not None:
        kept = {u: h for u, h in histories.items() if allowed(u)}
        excluded = len(histories) - len(kept)
        histories = kept
    return Dataset(histories, load_spec(spec or DEFAULT_SPECS[fmt]), str(path), len(result.bad), excluded)


def write_sample_data(path: str | Path, users: int = 300, items: int = 200, events_per_user: tuple[int, int] = (20, 60), seed: int = 0) -> Path:
    """Generated events with planted structure, in the generic JSONL format: items belong to
    genres, each user prefers two genres and tends to move to the item after the one just seen
    (a sequential pattern a causal encoder can learn and popularity cannot)."""
    rng = random.Random(seed)
    genres = ["action", "comedy", "drama", "horror", "romance", "scifi", "docs", "kids"]
    item_genre = {i: genres[i % len(genres)] for i in range(items)}
    by_genre = {g: [i for i in range(items) if item_genre[i] == g] for g in genres}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = 1_600_000_000
    with path.open("w", encoding="utf-8") as f:
        for u in range(users):
            liked = rng.sample(genres, 2)
            ts = t0 + rng.randrange(86_400 * 30)
            item = rng.choice(by_genre[liked[0]])
            for _ in range(rng.randint(*events_per_user)):
                genre = item_genre[item]
                rating = 5 if genre in liked else rng.choice([1, 2, 3])
                record = {"user_id": f"u{u}", "item_id": f"i{item}", "timestamp": ts, "rating": rating, "genres": [genre]}
                f.write(json.dumps(record) + "\n")
                ts += rng.choice([60, 600, 3600, 86_400])
                # Next item: usually the next one of a liked genre's list, sometimes random.
                if rng.random() < 0.8:
                    g = rng.choice(liked) if genre not in liked or rng.random() < 0.3 else genre
                    pool = by_genre[g]
                    item = pool[(pool.index(item) + 1) % len(pool)] if item in pool else rng.choice(pool)
                else:
                    item = rng.randrange(items)
    return path
