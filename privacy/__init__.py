"""Envelope encryption, key-encryption keys and keyed hashes. Imports nothing of ours."""
from privacy.envelope import (
    FORMAT_VERSION,
    DataKeyCipher,
    DecryptionError,
    aad_builder,
    associated_data,
    new_data_key,
    owner_aad,
)
from privacy.hashing import KeyedHasher, RecordMac, sha256_hex
from privacy.kek import (
    KekDirectory,
    KekMissingError,
    KekProvider,
    LocalKek,
    WrappedKey,
    kek_from_env,
    parse_kek_entries,
)

__all__ = [
    "FORMAT_VERSION",
    "DataKeyCipher",
    "DecryptionError",
    "aad_builder",
    "associated_data",
    "new_data_key",
    "owner_aad",
    "KeyedHasher",
    "RecordMac",
    "sha256_hex",
    "KekDirectory",
    "KekMissingError",
    "KekProvider",
    "LocalKek",
    "WrappedKey",
    "kek_from_env",
    "parse_kek_entries",
]
