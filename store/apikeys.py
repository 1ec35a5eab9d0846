"""API keys: random 256-bit tokens shown once; only their SHA-256 is stored, with scopes."""
from __future__ import annotations

import hashlib
import re
import secrets
import time

from sqlalchemy import Engine, select, update

from store.models import ApiKey

SCOPE_RE = re.compile(r"^[a-z][a-z0-9_:.-]{0,31}$")
TOKEN_PREFIX = "ulk_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(engine: Engine, scopes: list[str], label: str = "") -> str:
    if not scopes or not all(SCOPE_RE.match(s) for s in scopes):
        raise ValueError("scopes must be short lowercase names like read, write, admin")
    if len(label) > 100:
        raise ValueError("label is longer than 100 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(ApiKey.__table__.insert().values(key_hash=_hash(token), scopes=",".join(sorted(set(scopes))), label=label, created_at=int(time.time())))
    return token


def check_key(engine: Engine, token: str) -> set[str] | None:
    """The token's scopes, or None when it is unknown or revoked."""
    with engine.connect() as conn:
        row = conn.execute(select(ApiKey.scopes, ApiKey.revoked_at).where(ApiKey.key_hash == _hash(token))).first()
    return None if row is None or row.revoked_at is not None else set(row.scopes.split(","))


def revoke_key(engine: Engine, token: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(update(ApiKey).where(ApiKey.key_hash == _hash(token)).values(revoked_at=int(time.time()))).rowcount > 0
