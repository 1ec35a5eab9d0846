"""User embeddings from an encoder checkpoint, and storing them: what `userllm embed` and the
service's embedding refresh both call."""
from __future__ import annotations

import numpy as np

from userenc.checkpoint import LoadedEncoder
from userenc.events import Event


def embed_users(loaded: LoadedEncoder, histories: dict[str, list[Event]], batch_size: int = 256,
                bf16: bool = False) -> tuple[list[str], np.ndarray]:
    """(users in sorted order, [N, out_dim] float32 embeddings in that order)."""
    users = sorted(histories)
    return users, loaded.embed((histories[u] for u in users), batch_size=batch_size, bf16=bf16)


def store_embeddings(store, loaded: LoadedEncoder, users: list[str], vectors: np.ndarray) -> int:  # noqa: ANN001
    """Seal the vectors into the store under the encoder's version and index them for
    similar-user search; returns how many were stored (erased users are skipped)."""
    return store.put_embeddings(dict(zip(users, vectors)), loaded.version)
