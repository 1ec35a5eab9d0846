"""Keyed hashes (HMAC-SHA256) of identifiers: lookups and tombstones without storing the id.

The hashing key ("pepper") is random, lives wrapped by the KEK in the key store, and is rewrapped
(never changed) when the KEK rotates: changing it would orphan every lookup and tombstone.
"""
from __future__ import annotations

import hashlib
import hmac


class KeyedHasher:
    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        assert len(key) >= 32, "pepper must be at least 256 bits"
        self._key = key

    def user(self, external_id: str) -> str:
        """64 hex chars: the only form of an external user id the stores keep in clear."""
        return hmac.digest(self._key, b"user|" + external_id.encode(), "sha256").hex()

    def event(self, event_id: str) -> str:
        """32 hex chars (128 bits): an event's row id, known before encryption so the AAD binds it."""
        return hmac.digest(self._key, b"event|" + event_id.encode(), "sha256")[:16].hex()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
