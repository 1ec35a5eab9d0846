"""Training honours erasure: a filter for training jobs, the erasure part of a checkpoint
manifest, and the scan that finds checkpoints trained on users erased since.

A checkpoint records the keyed hashes of its users in `users.keyed-hashes.txt` (keyed with the
node's pepper: meaningless without the key store), their SHA-256 and the tombstone version at
training time. `stale_models` needs nothing personal to decide membership.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from privacy import KeyedHasher

USER_HASHES_FILE = "users.keyed-hashes.txt"


def write_private(path: Path, text: str) -> None:
    """Write a file that names users (even by keyed id) owner-only, 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


@dataclass(slots=True, frozen=True)
class TrainingFilter:
    hasher: KeyedHasher
    tombstones: frozenset[str]
    tombstone_version: int

    def keyed_hash(self, external_id: str) -> str:
        return self.hasher.user(external_id)

    def allowed(self, external_id: str) -> bool:
        return self.hasher.user(external_id) not in self.tombstones


def training_filter(store) -> TrainingFilter:  # noqa: ANN001
    tombs = store.keys.tombstones()
    return TrainingFilter(store.hasher, frozenset(tombs), max((t.version for t in tombs.values()), default=0))


def user_set_sha256(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def manifest_users(store, external_ids, checkpoint_dir: str | Path | None = None) -> dict:  # noqa: ANN001
    """The `erasure` section of a checkpoint manifest; writes the keyed-hash list beside it."""
    f = training_filter(store)
    hashes = sorted({f.keyed_hash(u) for u in external_ids})
    refused = [h for h in hashes if h in f.tombstones]
    if refused:
        raise ValueError(f"{len(refused)} of the training users are erased; filter them with store.training_filter()")
    section = {
        "user_set_sha256": user_set_sha256(hashes),
        "user_count": len(hashes),
        "tombstone_version": f.tombstone_version,
        "user_hashes_file": USER_HASHES_FILE,
    }
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_private(d / USER_HASHES_FILE, "\n".join(hashes) + ("\n" if hashes else ""))
    return section


@dataclass(slots=True)
class CheckpointStatus:
    path: Path
    status: str  # "stale" | "current" | "unknown"
    erased_users: int
    reason: str = ""


def stale_models(store, runs_dir: str | Path) -> list[CheckpointStatus]:  # noqa: ANN001
    """Every checkpoint folder (has manifest.json) under runs_dir, judged against the tombstones."""
    tombs = store.keys.tombstones()
    out = []
    for manifest_path in sorted(Path(runs_dir).rglob("manifest.json")):
        ckpt = manifest_path.parent
        try:
            section = json.loads(manifest_path.read_text()).get("erasure") or {}
            version = int(section["tombstone_version"])
            hashes_path = ckpt / section.get("user_hashes_file", USER_HASHES_FILE)
            hashes = [line.strip() for line in hashes_path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            out.append(CheckpointStatus(ckpt, "unknown", 0, f"no usable erasure manifest ({type(err).__name__})"))
            continue
        if user_set_sha256(hashes) != section.get("user_set_sha256"):
            out.append(CheckpointStatus(ckpt, "unknown", 0, "user list does not match its hash in the manifest"))
            continue
        erased = sum(1 for h in hashes if h in tombs and tombs[h].version > version)
        out.append(CheckpointStatus(ckpt, "stale" if erased else "current", erased))
    return out
