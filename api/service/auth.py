"""API keys: `Authorization: Bearer <key>` (or `X-API-Key`). Keys are random 256-bit tokens
stored only as their SHA-256 (store/apikeys.py, `userllm admin create-key`); the lookup is by
hash and the match re-checked with hmac.compare_digest. No key, or an unknown or revoked key:
401. A valid key without the route's scope: 403. Scopes are exact: `admin` opens the admin
routes only (give a key several scopes where one caller needs several)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time

from fastapi import Request
from sqlalchemy import select

from api.service.errors import ApiError
from store.models import ApiKey

CHALLENGE = {"WWW-Authenticate": "Bearer"}


class KeyChecker:
    """Resolves tokens to scopes, remembering answers for `ttl_s` (a revoked key stops working
    within that time) so a busy read path does not query the database per request."""

    def __init__(self, engine, ttl_s: float = 5.0):  # noqa: ANN001
        self.engine, self.ttl = engine, ttl_s
        self._cache: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, frozenset[str] | None]:
        """(known, scopes) from memory alone: no I/O, so the event loop may call it."""
        hit = self._cache.get(hashlib.sha256(token.encode()).hexdigest())
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def forget(self) -> None:
        """Drop every remembered answer (a key was revoked here: it stops working at once)."""
        with self._lock:
            self._cache.clear()

    def scopes(self, token: str) -> frozenset[str] | None:
        known, scopes = self.cached(token)
        if known:
            return scopes
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ApiKey.key_hash, ApiKey.scopes, ApiKey.revoked_at).where(ApiKey.key_hash == digest)
            ).first()
        found = None
        if row is not None and hmac.compare_digest(row.key_hash, digest) and row.revoked_at is None:
            found = frozenset(row.scopes.split(","))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.ttl, found)
        return found


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return request.headers.get("x-api-key") or None


def require(scope: str):  # noqa: ANN201
    """A dependency: the request's key must hold `scope`."""

    async def check(request: Request) -> frozenset[str]:
        token = bearer(request)
        if token is None:
            raise ApiError(401, "an API key is required (Authorization: Bearer <key>)", CHALLENGE)
        keys = request.app.state.keys
        known, scopes = keys.cached(token)
        if not known:  # the database, off the event loop
            scopes = await asyncio.to_thread(keys.scopes, token)
        if scopes is None:
            raise ApiError(401, "unknown or revoked API key", CHALLENGE)
        if scope not in scopes:
            raise ApiError(403, f"this API key lacks the {scope!r} scope")
        return scopes

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return check
