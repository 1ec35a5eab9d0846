"""Append-only audit log with a hash chain.

Entry n stores `prev_hash` (entry n-1's hash) and `entry_hash = sha256(canonical(seq, at, action,
details, prev_hash))`. Editing an entry breaks its own hash; removing one breaks the next link or
the sequence; cutting the tail is caught by the anchor (last seq and hash) kept in the key store.
Details hold counts and keyed hashes only, never personal data.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from sqlalchemy import Connection, Engine, select

from store.models import AuditEntry

GENESIS = "0" * 64


def canonical(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"))


def entry_hash(seq: int, at: int, action: str, details_json: str, prev_hash: str) -> str:
    body = json.dumps([seq, at, action, details_json, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append(conn: Connection, action: str, details: dict[str, Any]) -> tuple[int, str]:
    """Append inside the caller's transaction; returns (seq, hash) for the anchor."""
    last = conn.execute(select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)).first()
    seq, prev = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
    at, body = int(time.time()), canonical(details)
    h = entry_hash(seq, at, action, body, prev)
    conn.execute(AuditEntry.__table__.insert().values(seq=seq, at=at, action=action, details=body, prev_hash=prev, entry_hash=h))
    return seq, h


def verify(engine: Engine, anchor: tuple[int, str] | None) -> list[str]:
    """Problems found, empty when the log is intact."""
    problems: list[str] = []
    prev, expected_seq, seen = GENESIS, 1, {}
    with engine.connect() as conn:
        for e in conn.execute(select(*AuditEntry.__table__.c).order_by(AuditEntry.seq)):
            if e.seq != expected_seq:
                problems.append(f"entry {expected_seq} missing (next is {e.seq})")
            if e.prev_hash != prev:
                problems.append(f"entry {e.seq}: link to the previous entry is broken")
            if entry_hash(e.seq, e.at, e.action, e.details, e.prev_hash) != e.entry_hash:
                problems.append(f"entry {e.seq}: contents do not match its hash (edited)")
            prev, expected_seq, seen[e.seq] = e.entry_hash, e.seq + 1, e.entry_hash
    if anchor is not None:
        seq, h = anchor
        if seen.get(seq) != h:
            problems.append(f"entry {seq} recorded in the key-store anchor is missing or differs (log truncated or rewritten)")
    return problems
