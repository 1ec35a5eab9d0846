"""Admin operations the CLI only parses and prints: init, API keys, KEK rotation.

(Erasure, verify-deleted and restore-check live in store/erasure.py and store/restore.py; audit
verification is `Store.audit_report`.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from privacy import KekDirectory
from store.apikeys import new_key, revoke_key_id
from store.errors import StoreIntegrityError
from store.store import Store


def init_store(
    home: str | os.PathLike | None = None, url: str | None = None, keys_url: str | None = None
) -> tuple[Store, bool]:
    """Open the store, creating it where none exists at all: (store, created)."""
    store = Store.open(home, url, keys_url, create=True)
    return store, store.created


def create_api_key(store: Store, scopes: list[str], label: str = "") -> str:
    """A new API key (shown once; only its hash is kept), recorded in the audit log."""
    return new_api_key(store, scopes, label)[1]


def new_api_key(store: Store, scopes: list[str], label: str = "") -> tuple[int, str]:
    """create_api_key, with the key's id: (id, token)."""
    key_id, token = new_key(store.data, scopes, label)
    store.audit("api-key.created", {"key_id": key_id, "scopes": sorted(set(scopes))})
    return key_id, token


def revoke_api_key(store: Store, key_id: int) -> bool:
    """Revoke an API key by its id (from `list_keys`), recorded in the audit log; False when no
    live key has that id."""
    revoked = revoke_key_id(store.data, key_id)
    if revoked:
        store.audit("api-key.revoked", {"key_id": key_id})
    return revoked


@dataclass(slots=True)
class RotationReport:
    to_version: int
    minted: bool
    resumed: bool
    data_keys: int
    secrets: int
    removed_versions: list[int] = field(default_factory=list)


def rotate_kek(
    store: Store,
    mint: bool = True,
    remove_old: bool = False,
    batch: int = 500,
    on_batch: Callable[[int], None] | None = None,
) -> RotationReport:
    """Rewrap every key under the current KEK version; first mint a new version in the key
    directory, unless an interrupted rotation is still under way (then resume it: each key is
    rewrapped exactly once). `remove_old` then destroys the older versions, which closes the
    window in which a key-store backup from before an erasure opens the erased user's data."""
    kek = store.keys.kek
    directory = kek if isinstance(kek, KekDirectory) else None
    if remove_old and directory is None:
        raise ValueError(
            "--remove-old works on the key directory only; remove old versions from USERLLM_KEK or USERLLM_KEK_FILE yourself"
        )
    if batch < 1:
        raise ValueError("batch size must be at least 1")
    behind = set(store.keys.kek_versions_in_use()) - {kek.current_version()}
    resumed, minted = bool(behind), False
    if not resumed and mint and directory is not None:
        directory.new_version()
        minted = True
    counts = store.keys.rewrap_all(batch=batch, on_batch=on_batch)
    in_use = store.keys.kek_versions_in_use()
    if set(in_use) - {kek.current_version()}:
        raise StoreIntegrityError(
            f"keys remain under KEK versions {sorted(set(in_use) - {kek.current_version()})} after rewrapping; old versions were kept"
        )
    report = RotationReport(
        kek.current_version(), minted, resumed, counts["data_keys"], counts["secrets"]
    )
    store.audit(
        "kek.rotated",
        {"to_version": report.to_version, "minted": minted, "resumed": resumed, **counts},
    )
    if remove_old:
        for v in directory.versions()[:-1]:
            directory.remove_version(v)
            report.removed_versions.append(v)
        store.audit("kek.removed", {"versions": report.removed_versions})
    return report
