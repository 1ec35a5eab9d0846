"""Encrypted store: events, embeddings, keys, FAISS index, erasure, audit.

Integration API (see store/store.py for details):
    from store import Store
    with Store.open(home=None, url=None, keys_url=None) as s:  # honours USERLLM_HOME, USERLLM_DATABASE_URL,
                                                               # USERLLM_KEYS_DATABASE_URL, USERLLM_KEK[_FILE]
        s.ingest(events, batch_size=1000) -> IngestCounts      # idempotent by (user, event id)
        s.history(external_id) -> list[Event]                  # timestamp order, decrypted in memory
        s.histories() -> iter[(external_id, list[Event])]      # live users only (tombstoned excluded)
        s.put_embeddings({external_id: np.ndarray}, encoder_version) -> int
        s.embedding(external_id, encoder_version) -> np.ndarray | None
        s.similar_users(external_id, k=10) -> list[(external_id, cosine)]
    Store.open(..., create=True) also creates a store where none exists (else StoreStateError).
    Reads raise StoreIntegrityError for data that does not authenticate as the user read.
    training_filter(s) -> TrainingFilter (.allowed(ext), .keyed_hash(ext), .tombstone_version)
    manifest_users(s, external_ids, checkpoint_dir) -> dict  # put under manifest.json["erasure"]
"""

from store.erasure import ErasureReport, Verification, delete_user, verify_deleted
from store.erasure_training import TrainingFilter, manifest_users, stale_models, training_filter
from store.errors import StoreError, StoreIntegrityError, StoreStateError
from store.records import IngestCounts
from store.restore import RestoreReport, restore_check
from store.store import Store

__all__ = [
    "Store",
    "IngestCounts",
    "StoreError",
    "StoreIntegrityError",
    "StoreStateError",
    "ErasureReport",
    "Verification",
    "delete_user",
    "verify_deleted",
    "RestoreReport",
    "restore_check",
    "TrainingFilter",
    "training_filter",
    "manifest_users",
    "stale_models",
]
