"""Where training and embedding read users from, and how they honour erasure.

A data path in a format reads files; when a store exists at USERLLM_HOME (or a database URL is
set), its tombstones filter the users out. `from_store` reads the store's (decrypted in
memory) histories, which already exclude erased users. Either way the checkpoint manifest gets
the store's `erasure` section (user-set hash, tombstone version, keyed-hash list) so that
`userllm admin stale-models` can tell when a model has users erased since.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data import Dataset, load_dataset
from userenc.events import order_history
from userenc.spec import load_spec


def store_configured() -> bool:
    from store.db import resolve_home

    return bool(os.environ.get("USERLLM_DATABASE_URL")) or (resolve_home() / "store.db").is_file()


@dataclass(slots=True)
class Source:
    dataset: Dataset
    store: Any = None  # store.Store when one is in use
    notes: list[str] = field(default_factory=list)

    def erasure_manifest(self) -> tuple[dict[str, Any], dict[str, str]]:
        """({"erasure": section}, {file name: text}) for the checkpoint; empty without a store."""
        if self.store is None:
            return {}, {}
        from store import manifest_users, training_filter
        from store.erasure_training import USER_HASHES_FILE

        users = list(self.dataset.histories)
        section = manifest_users(self.store, users)
        hashes = sorted({training_filter(self.store).keyed_hash(u) for u in users})
        return {"erasure": section}, {USER_HASHES_FILE: "\n".join(hashes) + ("\n" if hashes else "")}

    def erasure_manifest_with(self, checkpoint: str | Path | None) -> tuple[dict[str, Any], dict[str, str]]:
        """As erasure_manifest, with the users of a checkpoint this model builds on (an
        adapter's encoder) added: erasing any of them makes this model stale too."""
        section, files = self.erasure_manifest()
        if not section or checkpoint is None:
            return section, files
        from store.erasure_training import USER_HASHES_FILE, user_set_sha256

        theirs = Path(checkpoint) / USER_HASHES_FILE
        if not theirs.is_file():
            return section, files
        hashes = sorted(set(files[USER_HASHES_FILE].split()) | set(theirs.read_text().split()))
        section["erasure"] |= {"user_set_sha256": user_set_sha256(hashes), "user_count": len(hashes)}
        return section, {USER_HASHES_FILE: "\n".join(hashes) + "\n"}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def open_source(data: str | os.PathLike | None = None, fmt: str = "movielens",
                spec_name: str | None = None, skip_bad: bool = False,
                from_store: bool = False) -> Source:
    """Users' histories from the store (`from_store`) or from the `data` file or folder in
    format `fmt` (a configured store's tombstones filter erased users out)."""
    if from_store == (data is not None):
        raise ValueError("read from the store or from a data path: exactly one of them")
    if from_store:
        from store import Store

        store = Store.open()
        histories = {ext: order_history(h) for ext, h in store.histories() if h}
        if not histories:
            store.close()
            raise ValueError("the store holds no events (run `userllm ingest` first)")
        ds = Dataset(histories, load_spec(spec_name or "generic"), "store", 0, 0)
        return Source(ds, store)
    store = None
    if store_configured():
        from store import Store, training_filter

        store = Store.open()
        allowed = training_filter(store).allowed
    else:
        allowed = None
    ds = load_dataset(data, fmt, spec_name, skip_bad, allowed)
    source = Source(ds, store)
    if ds.bad_lines:
        source.notes.append(f"skipped {ds.bad_lines} malformed lines")
    if ds.excluded_users:
        source.notes.append(f"excluded {ds.excluded_users} erased users")
    return source
