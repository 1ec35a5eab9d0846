"""Append-only audit log with a hash chain, anchored outside the data database.

Entry n stores `prev_hash` (entry n-1's hash) and `entry_hash = sha256(canonical(seq, at, action,
details, prev_hash))`. Editing an entry breaks its own hash; removing one breaks the next link.
Cutting, rolling back or extending the log is caught by two anchors holding the tail as last
written, each with a MAC under a key-store secret:
  - the key store's anchor (survives a restore of the data database), written inside the
    append's transaction, so the log always ends at its `latest` entry or, after a crash between
    the two commits, at its `prior` one;
  - a node file, USERLLM_HOME/audit-anchor-<store id>.json (survives a restore of both databases): the log
    must still hold the entry it names.
Each append checks both before it extends the chain; on a mismatch it still records the entry
but refuses to re-anchor, so the gap stays visible until `restore-check` acknowledges it.
Details hold counts and keyed hashes only, never personal data.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select

from privacy import RecordMac
from store.models import AuditEntry

GENESIS = "0" * 64
GAP_ACTION = "audit.gap-acknowledged"
Tail = tuple[int, str]


def canonical(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"))


def entry_hash(seq: int, at: int, action: str, details_json: str, prev_hash: str) -> str:
    body = json.dumps([seq, at, action, details_json, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def tail(conn: Connection) -> Tail:
    last = conn.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    return (last.seq, last.entry_hash) if last else (0, GENESIS)


def append(conn: Connection, prev: Tail, action: str, details: dict[str, Any]) -> Tail:
    """Append after `prev` (the tail read in this transaction); returns the new tail."""
    seq, at, body = prev[0] + 1, int(time.time()), canonical(details)
    h = entry_hash(seq, at, action, body, prev[1])
    conn.execute(
        AuditEntry.__table__.insert().values(
            seq=seq, at=at, action=action, details=body, prev_hash=prev[1], entry_hash=h
        )
    )
    return seq, h


class NodeAnchor:
    """USERLLM_HOME/audit-anchor-<store id>.json: the last tail this node wrote, with a MAC."""

    def __init__(self, path: Path, mac: RecordMac):
        self.path, self.mac = path, mac
        # Threads of one process (a server's requests, its erasure worker) append concurrently:
        # their anchor writes are serialized and never move the anchor back to an older entry.
        self._lock, self._written = threading.Lock(), 0

    def read(self) -> Tail | None:
        try:
            d = json.loads(self.path.read_text())
            seq, h, tag = int(d["seq"]), str(d["entry_hash"]), str(d["mac"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return (-1, "unreadable")
        return (seq, h) if self.mac.check(tag, "node-anchor", seq, h) else (-1, "forged")

    def write(self, t: Tail) -> None:
        with self._lock:
            if t[0] <= self._written:
                return
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}.{threading.get_ident()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"seq": t[0], "entry_hash": t[1],
                           "mac": self.mac.tag("node-anchor", t[0], t[1])}, f)
            os.replace(tmp, self.path)
            self._written = t[0]


def anchor_gaps(conn: Connection, log_tail: Tail, anchor, node: Tail | None) -> list[str]:  # noqa: ANN001
    """Why the log does not end where the anchors say it should (empty when it does)."""
    gaps = []
    if anchor is None:
        if log_tail[0] > 0:
            gaps.append(
                f"the log holds {log_tail[0]} entries but the key store has no anchor for them (key store replaced?)"
            )
    elif log_tail not in anchor:
        prior, latest = anchor
        gaps.append(
            f"the log ends at entry {log_tail[0]} but the key-store anchor names entry {latest[0]}"
            f"{' (or ' + str(prior[0]) + ')' if prior != latest else ''}: it was cut, rolled back or extended outside userllm"
        )
    if node is not None:
        if node[0] < 0:
            gaps.append(f"the node's audit anchor file is {node[1]}")
        elif node[0] > 0:
            at = conn.execute(
                select(AuditEntry.entry_hash).where(AuditEntry.seq == node[0])
            ).scalar()
            if at != node[1]:
                gaps.append(
                    f"this node wrote entry {node[0]}, which the log no longer holds as written: both databases were restored or rolled back"
                )
    return gaps


@dataclass(slots=True)
class AuditReport:
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify(engine: Engine, anchor, node: Tail | None) -> AuditReport:  # noqa: ANN001
    """Chain, links and both anchors. Gaps acknowledged by restore-check are notes, not problems."""
    report = AuditReport()
    prev, expected_seq = GENESIS, 1
    with engine.connect() as conn:
        for e in conn.execute(select(*AuditEntry.__table__.c).order_by(AuditEntry.seq)):
            if e.seq != expected_seq:
                report.problems.append(f"entry {expected_seq} missing (next is {e.seq})")
            if e.prev_hash != prev:
                report.problems.append(f"entry {e.seq}: link to the previous entry is broken")
            if entry_hash(e.seq, e.at, e.action, e.details, e.prev_hash) != e.entry_hash:
                report.problems.append(f"entry {e.seq}: contents do not match its hash (edited)")
            elif e.action == GAP_ACTION:
                report.notes.append(
                    f"entry {e.seq}: restore-check acknowledged a gap: {'; '.join(json.loads(e.details).get('gaps', []))}"
                )
            prev, expected_seq = e.entry_hash, e.seq + 1
            report.entries += 1
        report.problems += anchor_gaps(conn, tail(conn), anchor, node)
    return report


def entries(engine: Engine, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Entries after sequence number `after`, oldest first (details hold counts and keyed
    hashes only)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(*AuditEntry.__table__.c)
            .where(AuditEntry.seq > after)
            .order_by(AuditEntry.seq)
            .limit(limit)
        ).all()
    return [
        {
            "seq": r.seq,
            "at": r.at,
            "action": r.action,
            "details": json.loads(r.details),
            "entry_hash": r.entry_hash,
        }
        for r in rows
    ]
