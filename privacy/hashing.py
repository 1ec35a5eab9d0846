"""Keyed hashes of identifiers: lookups and tombstones without storing the id.

Keyed BLAKE2b (a MAC/PRF in its own right, RFC 7693; ~4x faster than HMAC-SHA256 in Python,
which matters on the ingest hot path), domain-separated by BLAKE2's personalization string. The
key ("pepper") is random, lives wrapped by the KEK in the key store, and is rewrapped (never
changed) when the KEK rotates: changing it would orphan every lookup and tombstone.
"""
from __future__ import annotations

import hashlib


class KeyedHasher:
    __slots__ = ("_user", "_event")

    def __init__(self, key: bytes):
        assert 32 <= len(key) <= 64, "pepper must be 256 to 512 bits"
        # Keyed states prepared once; each hash copies one (cheaper than re-keying).
        self._user = hashlib.blake2b(key=key, digest_size=32, person=b"userllm-user")
        self._event = hashlib.blake2b(key=key, digest_size=16, person=b"userllm-event")

    def user(self, external_id: str) -> str:
        """64 hex chars: the only form of an external user id the stores keep in clear."""
        h = self._user.copy()
        h.update(external_id.encode())
        return h.hexdigest()

    def event(self, event_id: str) -> bytes:
        """16 bytes (128 bits): an event's row id, known before encryption so the AAD binds it
        (as hex). Bytes, not hex, in the table: a smaller primary key makes inserts cheaper."""
        h = self._event.copy()
        h.update(event_id.encode())
        return h.digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
