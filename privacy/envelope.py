"""Envelope encryption of one record field: AES-256-GCM under a per-user data key.

A sealed value is `version byte || 96-bit random nonce || ciphertext+tag`. The associated data
binds it to its place: table, column, row id and, for personal data, the owner (the user's
internal id and keyed id, i.e. the keyed hash of their external id). A ciphertext copied to
another user's row, another row or another column, or read for another user, fails to
authenticate. Errors never carry plaintext or key material: only the location that failed.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1  # the sealed-value layout (header byte)
OWNER_AAD_VERSION = 2  # AAD that names the owner's keyed id (v1 named only the internal id)
NONCE_BYTES = 12  # 96 bits: GCM's native nonce size; random nonces are safe far past our volumes
KEY_BYTES = 32  # AES-256
_HEADER = bytes([FORMAT_VERSION])


class DecryptionError(ValueError):
    """A ciphertext did not authenticate (wrong key, wrong place, or altered)."""


def _check_place(table: str, column: str, parts: tuple[str, ...]) -> None:
    # Not asserts: the AAD's unambiguity is a security property and must survive `python -O`.
    if not (table.isidentifier() and column.isidentifier()):
        raise ValueError("AAD table and column must be identifiers")
    if any("|" in p for p in parts):
        raise ValueError("AAD row ids and owner ids never hold '|'")


def associated_data(
    table: str, column: str, user_id: int, row_id: str | int, version: int = FORMAT_VERSION
) -> bytes:
    """The v1 AAD: node-level fields (owner 0) and stores written before owner binding."""
    row = str(row_id)
    _check_place(table, column, (row,))
    return f"userllm|v{version}|{table}|{column}|{int(user_id)}|{row}".encode()


def owner_aad(table: str, column: str, user_id: int, owner: str, row_id: str | int) -> bytes:
    """The AAD of a personal field: binds it to the user's internal id and keyed id, so a read
    for user U opens only what was sealed for U."""
    row = str(row_id)
    _check_place(table, column, (row, owner))
    return f"userllm|v{OWNER_AAD_VERSION}|{table}|{column}|{int(user_id)}|{owner}|{row}".encode()


def aad_builder(table: str, column: str):  # noqa: ANN201
    """A fast `owner_aad` for one (table, column): the hot ingest loop calls it per row. Owner
    ids are keyed hashes and row ids hashes or integers, checked by the callers' types."""
    _check_place(table, column, ())
    prefix = f"userllm|v{OWNER_AAD_VERSION}|{table}|{column}|"

    def build(user_id: int, owner: str, row_id: str | int) -> bytes:
        return f"{prefix}{user_id}|{owner}|{row_id}".encode()

    return build


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class DataKeyCipher:
    """Seals and opens fields under one data key. Build one per user key and reuse it: the
    AESGCM object holds the expanded key schedule."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError("data keys are AES-256 (32 bytes)")
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
                f"{where}: ciphertext does not authenticate (wrong user key, moved to another row, column or user, or altered)"
            ) from None
