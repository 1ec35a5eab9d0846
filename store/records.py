"""Validation at the edge and the sealed payload format of one event.

Every event is checked before anything is written, so bad input changes nothing. Messages name
the event's position, never its contents (event ids embed user ids)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from userenc.events import Event

MAX_ID_CHARS = 256
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_TIMESTAMP = 2**40
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(slots=True)
class IngestCounts:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0  # already stored (a retried batch) or repeated in the input
    tombstoned: int = 0  # belongs to an erased user: refused, never stored
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


def encode_payload(e: Event, position: int) -> bytes:
    # Fast path first (one pass of cheap type checks); the slow path names what is wrong.
    if (
        type(e) is Event
        and type(e.event_id) is str
        and type(e.user_id) is str
        and type(e.item_id) is str
        and 0 < len(e.event_id) <= MAX_ID_CHARS
        and 0 < len(e.user_id) <= MAX_ID_CHARS
        and 0 < len(e.item_id) <= MAX_ID_CHARS
        and type(e.timestamp) is int
        and 0 <= e.timestamp < MAX_TIMESTAMP
        and type(e.fields) is dict
        and all(type(k) is str for k in e.fields)
    ):
        try:
            data = _to_json([e.event_id, e.item_id, e.timestamp, e.fields]).encode()
        except (TypeError, ValueError):
            raise ValueError(f"event #{position}: fields must be JSON values (str, number, bool, list, dict) without NaN") from None
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"event #{position}: record is {len(data)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
        return data
    _explain(e, f"event #{position}")
    raise AssertionError("unreachable: _explain always raises")


def _explain(e: Event, where: str) -> None:
    if not isinstance(e, Event):
        raise ValueError(f"{where}: expected an Event, got {type(e).__name__}")
    for name in ("event_id", "user_id", "item_id"):
        value = getattr(e, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {name} must be a non-empty string (got {type(value).__name__})")
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"{where}: {name} is longer than {MAX_ID_CHARS} characters")
    if type(e.timestamp) is not int or not 0 <= e.timestamp < MAX_TIMESTAMP:
        raise ValueError(f"{where}: timestamp must be an integer of UTC seconds (got {type(e.timestamp).__name__})")
    raise ValueError(f"{where}: fields must be a dict with string keys")


def decode_payload(data: bytes, external_id: str) -> Event:
    event_id, item_id, timestamp, fields = json.loads(data)
    return Event(event_id, external_id, item_id, timestamp, fields)
