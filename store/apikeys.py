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
    return new_key(engine, scopes, label)[1]


def new_key(engine: Engine, scopes: list[str], label: str = "") -> tuple[int, str]:
    """(the key's id, the token): the token is returned here once and never stored."""
    if not scopes or not all(SCOPE_RE.match(s) for s in scopes):
        raise ValueError("scopes must be short lowercase names like read, write, admin")
    if len(label) > 100:
        raise ValueError("label is longer than 100 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        key_id = conn.execute(ApiKey.__table__.insert().values(
            key_hash=_hash(token), scopes=",".join(sorted(set(scopes))), label=label,
            created_at=int(time.time())).returning(ApiKey.id)).scalar_one()
    return key_id, token


def check_key(engine: Engine, token: str) -> set[str] | None:
    """The token's scopes, or None when it is unknown or revoked."""
    with engine.connect() as conn:
        row = conn.execute(select(ApiKey.scopes, ApiKey.revoked_at).where(ApiKey.key_hash == _hash(token))).first()
    return None if row is None or row.revoked_at is not None else set(row.scopes.split(","))


def list_keys(engine: Engine) -> list[dict]:
    """Every key's id, label, scopes and times (never its hash), oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(select(ApiKey.id, ApiKey.label, ApiKey.scopes, ApiKey.created_at,
                                   ApiKey.revoked_at).order_by(ApiKey.id)).all()
    return [{"id": r.id, "label": r.label, "scopes": r.scopes.split(","),
             "created_at": r.created_at, "revoked_at": r.revoked_at} for r in rows]


def revoke_key_id(engine: Engine, key_id: int) -> bool:
    """Revoke the key with this id; False when no live key has it (unknown or already revoked)."""
    with engine.begin() as conn:
        return conn.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                            .values(revoked_at=int(time.time()))).rowcount > 0


def revoke_key(engine: Engine, token: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(update(ApiKey).where(ApiKey.key_hash == _hash(token)).values(revoked_at=int(time.time()))).rowcount > 0
