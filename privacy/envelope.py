"""Envelope encryption of one record field: AES-256-GCM under a per-user data key.

A sealed value is `version byte || 96-bit random nonce || ciphertext+tag`. The associated data
binds it to (table, column, user internal id, row id, format version), so a ciphertext copied to
another user's row, another row, or another column fails to authenticate. Errors never carry
plaintext or key material: only the location that failed.
"""
from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
NONCE_BYTES = 12  # 96 bits: GCM's native nonce size; random nonces are safe far past our volumes
KEY_BYTES = 32  # AES-256
_HEADER = bytes([FORMAT_VERSION])


class DecryptionError(ValueError):
    """A ciphertext did not authenticate (wrong key, wrong place, or altered)."""


def associated_data(table: str, column: str, user_id: int, row_id: str | int, version: int = FORMAT_VERSION) -> bytes:
    """The AAD for one field. Table and column are identifiers and row ids never hold '|', so the
    joined form is unambiguous."""
    row = str(row_id)
    assert table.isidentifier() and column.isidentifier(), (table, column)
    assert "|" not in row, "row ids are hashes or integers"
    return f"userllm|v{version}|{table}|{column}|{int(user_id)}|{row}".encode()


def aad_builder(table: str, column: str, version: int = FORMAT_VERSION):  # noqa: ANN201
    """A fast `associated_data` for one (table, column): the hot ingest loop calls it per row."""
    prefix = associated_data(table, column, 0, "")[: -len(b"0|")].decode()

    def build(user_id: int, row_id: str | int) -> bytes:
        return f"{prefix}{user_id}|{row_id}".encode()

    return build


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class DataKeyCipher:
    """Seals and opens fields under one data key. Build one per user key and reuse it: the
    AESGCM object holds the expanded key schedule."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        assert len(key) == KEY_BYTES, "data keys are AES-256"
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return _HEADER + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes, where: str = "field") -> bytes:
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[0] != FORMAT_VERSION:
            raise DecryptionError(f"{where}: not a sealed value of format version {FORMAT_VERSION}")
        try:
            return self._aead.decrypt(sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            # Deliberately says nothing about the contents.
            raise DecryptionError(
                f"{where}: ciphertext does not authenticate (wrong user key, moved to another row or column, or altered)"
            ) from None
