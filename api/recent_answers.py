"""This process's last recommendation answers, per (user, history digest, k).

A repeated read of an unchanged history then skips the sealed state's decryption and the
catalogue ranking. Safe by construction: the key holds the store's digest of the user's current
events, which the caller reads on every request first. A new event changes it (a miss), and an
erased user has none, so their entry is never reached again. Erasure on this node also drops
the user's entries (`forget`). Bounded: the least recently used entries go first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class RecentAnswers:
    __slots__ = ("capacity", "_entries", "_lock")

    def __init__(self, capacity: int = 4096) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bytes, int], list] = OrderedDict()
        self._lock = threading.Lock()  # the read pool's threads share one cache

    def get(self, external_id: str, digest: bytes, k: int) -> list | None:
        key = (external_id, digest, k)
        with self._lock:
            answer = self._entries.get(key)
            if answer is not None:
                self._entries.move_to_end(key)
            return answer

    def put(self, external_id: str, digest: bytes, k: int, answer: list) -> None:
        with self._lock:
            self._entries[(external_id, digest, k)] = answer
            self._entries.move_to_end((external_id, digest, k))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, external_id: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == external_id]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
