"""The shared event record (see ../shared/DESIGN.md, "Shared names")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class Event:
    """One interaction of one user with one item.

    `event_id` is unique per source (ingest is idempotent by it), `user_id` is the external id,
    `timestamp` is UTC seconds, `fields` holds what the feature spec declares (rating, genres,
    text, title, ...).
    """

    event_id: str
    user_id: str
    item_id: str
    timestamp: int
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "timestamp": self.timestamp,
            "fields": dict(self.fields),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        return cls(str(d["event_id"]), str(d["user_id"]), str(d["item_id"]), int(d["timestamp"]), dict(d.get("fields") or {}))


def order_history(events: list[Event]) -> list[Event]:
    """Timestamp order; ties keep their input order (Python's sort is stable)."""
    return sorted(events, key=lambda e: e.timestamp)


def group_by_user(events: list[Event]) -> dict[str, list[Event]]:
    """Histories per user, each in timestamp order with stable ties; users in first-seen order."""
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return {u: order_history(h) for u, h in by_user.items()}
