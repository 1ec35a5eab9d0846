"""Key-encryption keys (KEKs): versioned AES-256 keys that wrap data keys and secrets.

Sources, in the order `kek_from_env` tries them:
- `USERLLM_KEK`: base64 of one 32-byte key (version 1), or `N:base64,M:base64,...` for several
  versions; the highest version is current.
- `USERLLM_KEK_FILE`: a file holding the same `N:base64` entries, one per line.
- a key directory (default `USERLLM_HOME/kek/`): one file per version, `kek-v000001.key`, created
  0600 on first run. Only this source can mint a new version itself (`rotate-kek`).
Anything else (a KMS) implements the small `KekProvider` protocol.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.envelope import KEY_BYTES, NONCE_BYTES, DecryptionError


@dataclass(slots=True, frozen=True)
class WrappedKey:
    kek_version: int
    blob: bytes  # nonce || AES-GCM(kek, key, aad=context)


@runtime_checkable
class KekProvider(Protocol):
    """What a KMS must offer. `context` binds a wrapped key to its owner (e.g. b"data-key|user=7")."""

    def current_version(self) -> int: ...

    def versions(self) -> list[int]: ...

    def wrap(self, key: bytes, context: bytes) -> WrappedKey: ...

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes: ...


def _aad(version: int, context: bytes) -> bytes:
    return b"userllm-kek|v%d|" % version + context


class LocalKek:
    """KEKs held in this process (from the environment, a file, or a key directory)."""

    def __init__(self, keys: dict[int, bytes], source: str = "memory"):
        if not keys:
            raise ValueError(f"KEK source {source} holds no key")
        for v, k in keys.items():
            if v < 1 or len(k) != KEY_BYTES:
                raise ValueError(f"KEK source {source}: version {v} must be >= 1 and hold 32 bytes (AES-256)")
        self._keys = dict(keys)
        self.source = source

    def current_version(self) -> int:
        return max(self._keys)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, key: bytes, context: bytes) -> WrappedKey:
        v = self.current_version()
        nonce = os.urandom(NONCE_BYTES)
        return WrappedKey(v, nonce + AESGCM(self._keys[v]).encrypt(nonce, key, _aad(v, context)))

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        kek = self._keys.get(wrapped.kek_version)
        if kek is None:
            raise DecryptionError(
                f"KEK version {wrapped.kek_version} is not available from {self.source} (have {self.versions()}); "
                "was it removed before `userllm admin rotate-kek` finished?"
            )
        try:
            return AESGCM(kek).decrypt(wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:], _aad(wrapped.kek_version, context))
        except InvalidTag:
            raise DecryptionError("wrapped key does not authenticate under its KEK (wrong owner or altered)") from None


def parse_kek_entries(text: str, source: str) -> dict[int, bytes]:
    """`base64` alone (version 1) or `N:base64` entries separated by commas or newlines."""
    entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip() and not e.strip().startswith("#")]
    keys: dict[int, bytes] = {}
    for entry in entries:
        version_text, _, b64 = entry.rpartition(":")
        try:
            version = int(version_text) if version_text else 1
            keys[version] = base64.b64decode(b64, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"KEK source {source}: entries must be base64 or N:base64") from None
    return keys


class KekMissingError(LookupError):
    """No KEK where one must be: never answered by minting a new one (that would orphan every
    wrapped key)."""


class KekDirectory(LocalKek):
    """One 0600 file per KEK version in a 0700 directory. The first version is made only when a
    new store is created (`create=True`); an empty or missing directory is an error otherwise."""

    PATTERN = re.compile(r"^kek-v(\d{6})\.key$")

    def __init__(self, path: Path, create: bool = False):
        self.path = Path(path)
        keys = self._load()
        if not keys:
            if not create:
                raise KekMissingError(f"no KEK in {self.path}")
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write(1, AESGCM.generate_key(bit_length=256))
            keys = self._load()
        super().__init__(keys, source=str(self.path))

    @classmethod
    def holds_keys(cls, path: Path) -> bool:
        return path.is_dir() and any(cls.PATTERN.match(f.name) for f in path.iterdir())

    def _load(self) -> dict[int, bytes]:
        keys: dict[int, bytes] = {}
        if not self.path.is_dir():
            return keys
        for f in sorted(self.path.iterdir()):
            m = self.PATTERN.match(f.name)
            if m:
                keys[int(m.group(1))] = base64.b64decode(f.read_text().strip())
        return keys

    def _write(self, version: int, key: bytes) -> None:
        # O_EXCL + 0600 from the start: the key is never world-readable, not even briefly.
        fd = os.open(self.path / f"kek-v{version:06d}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def new_version(self) -> int:
        v = self.current_version() + 1
        key = AESGCM.generate_key(bit_length=256)
        self._write(v, key)
        self._keys[v] = key
        return v

    def remove_version(self, version: int) -> None:
        if version == self.current_version():
            raise ValueError("never remove the current KEK version")
        (self.path / f"kek-v{version:06d}.key").unlink()
        del self._keys[version]


def kek_from_env(home: Path, environ: dict[str, str] | None = None, create: bool = False) -> LocalKek:
    """The KEK named by the environment, else the key directory; `create` allows minting the
    directory's first version (a new store only)."""
    env = os.environ if environ is None else environ
    if env.get("USERLLM_KEK"):
        return LocalKek(parse_kek_entries(env["USERLLM_KEK"], "USERLLM_KEK"), source="USERLLM_KEK")
    if env.get("USERLLM_KEK_FILE"):
        path = Path(env["USERLLM_KEK_FILE"])
        return LocalKek(parse_kek_entries(path.read_text(), str(path)), source=str(path))
    return KekDirectory(Path(home) / "kek", create=create)
