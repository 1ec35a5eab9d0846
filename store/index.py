"""FAISS index of user embeddings: IndexIDMap2 over a flat inner-product index (cosine on unit
vectors), ids = user internal ids. One file per encoder version under USERLLM_HOME/index/,
sealed with the node's index key (vectors are personal data too) and replaced atomically
(temp file, fsync, rename), under a file lock so concurrent writers do not lose updates.
Flat + IDMap2 supports remove_ids, which erasure needs; HNSW could not remove ids.
"""
from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from privacy import DataKeyCipher, associated_data

def _faiss():
    import faiss  # imported on first use: most commands never touch the index

    return faiss


VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_version(encoder_version: str) -> str:
    if not isinstance(encoder_version, str) or not VERSION_RE.match(encoder_version):
        raise ValueError("encoder_version must be 1-64 characters of [A-Za-z0-9._-]")
    return encoder_version


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


class UserIndex:
    def __init__(self, directory: Path, key: bytes):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cipher = DataKeyCipher(key)
        self._read_cache: dict[str, tuple[tuple, object]] = {}  # version -> (file identity, index)

    def _path(self, version: str) -> Path:
        return self.dir / f"users-{check_version(version)}.faiss.sealed"

    def versions(self) -> list[str]:
        return sorted(p.name[len("users-") : -len(".faiss.sealed")] for p in self.dir.glob("users-*.faiss.sealed"))

    def current_version(self) -> str | None:
        f = self.dir / "CURRENT"
        return f.read_text().strip() if f.exists() else None

    @contextmanager
    def locked(self):
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self, version: str):  # noqa: ANN201 - a faiss.IndexIDMap2, or None
        """A private copy, safe to modify (then `save`)."""
        path = self._path(version)
        if not path.exists():
            return None
        raw = self._cipher.open(path.read_bytes(), associated_data("faiss_index", "file", 0, version), where=f"index file {path.name}")
        return _faiss().deserialize_index(np.frombuffer(raw, dtype=np.uint8))

    def _load_for_read(self, version: str):  # noqa: ANN202
        """Shared read-only copy, reloaded whenever the file was replaced (by any process)."""
        try:
            st = self._path(version).stat()
        except FileNotFoundError:
            self._read_cache.pop(version, None)
            return None
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._read_cache.get(version)
        if hit is None or hit[0] != ident:
            hit = self._read_cache[version] = (ident, self.load(version))
        return hit[1]

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def save(self, version: str, index) -> None:  # noqa: ANN001
        raw = _faiss().serialize_index(index).tobytes()
        self._write_atomic(self._path(version), self._cipher.seal(raw, associated_data("faiss_index", "file", 0, version)))

    def upsert(self, version: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        assert vectors.ndim == 2 and len(ids) == len(vectors)
        with self.locked():
            index = self.load(version)
            if index is None:
                faiss = _faiss()
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
            elif index.d != vectors.shape[1]:
                raise ValueError(f"embedding width {vectors.shape[1]} does not match the index for {version} ({index.d})")
            index.remove_ids(ids)  # an update replaces the old vector
            index.add_with_ids(unit_rows(vectors), ids)
            self.save(version, index)
            self._write_atomic(self.dir / "CURRENT", version.encode())

    def remove_everywhere(self, user_id: int) -> int:
        removed = 0
        with self.locked():
            for version in self.versions():
                index = self.load(version)
                n = int(index.remove_ids(np.array([user_id], dtype=np.int64)))
                if n:
                    self.save(version, index)
                    removed += n
        return removed

    def count_of(self, user_id: int) -> int:
        """How many index files still hold this id (verify-deleted)."""
        found = 0
        for version in self.versions():
            index = self._load_for_read(version)
            found += int(index is not None and user_id in _faiss().vector_to_array(index.id_map))
        return found

    def search(self, version: str, user_id: int, k: int) -> list[tuple[int, float]]:
        index = self._load_for_read(version)
        if index is None or index.ntotal == 0:
            return []
        try:
            query = index.reconstruct(int(user_id)).reshape(1, -1)
        except RuntimeError:
            return []  # this user has no vector in this index
        scores, ids = index.search(query, min(k + 1, index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1 and i != user_id][:k]
