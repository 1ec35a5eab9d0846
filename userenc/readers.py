"""Readers for event sources: MovieLens-1M, Amazon 5-core JSON lines, generic JSONL and CSV.

Every reader yields `Event`s that pass the store's own checks (validation at the edge): ids are
strings or integers of at most MAX_ID_CHARS characters, timestamps UTC seconds in
[0, MAX_TIMESTAMP), numbers finite, a record's payload at most MAX_PAYLOAD_BYTES. A malformed
line raises `MalformedInputError` naming the file and line; with `skip_bad=True` it is counted in
`ReadResult.bad` instead. Nothing is dropped silently, and input without a single event is an
error. Messages name the file, line and field but never echo a value: a malformed line may
hold personal data, and these messages reach stderr and logs.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from userenc.events import Event

FORMATS = ("movielens", "amazon", "jsonl", "csv")
# The store's limits (store/records.py; a test keeps the two equal).
MAX_ID_CHARS = 256
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_TIMESTAMP = 2**40
# Re-encoding a line as the store's JSON grows it at most ~6x (a short float such as 1e15, a
# control character escaped as \u00XX), so only longer lines need the exact size check.
_EXACT_SIZE_FROM = (MAX_PAYLOAD_BYTES - 2048) // 8
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class MalformedInputError(ValueError):
    """A line that cannot be read; the message names the file and the line number."""


class EmptyInputError(MalformedInputError):
    """The input holds no event at all."""


class _Bad(ValueError):
    """A reason written by us, safe to show (names fields, never values)."""


@dataclass(slots=True, frozen=True)
class BadLine:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class ReadResult:
    events: list[Event] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.events)} events read, {len(self.bad)} malformed lines skipped"


class _Collector:
    """Collects events; turns a line's failure into an error or a counted bad line."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.result = ReadResult()

    def line(self, path: Path, lineno: int, parse: Callable[[], Event | None]) -> None:
        try:
            event = parse()
        except _Bad as err:
            self._bad(path, lineno, str(err))
        except KeyError as err:
            self._bad(path, lineno, f"missing field {err}")  # the key is one of our field names
        except (ValueError, TypeError, IndexError, RecursionError) as err:
            self._bad(
                path, lineno, f"malformed record ({type(err).__name__})"
            )  # foreign text may echo values
        else:
            if event is not None:
                self.result.events.append(event)

    def _bad(self, path: Path, lineno: int, reason: str) -> None:
        bad = BadLine(str(path), lineno, reason)
        if not self.skip_bad:
            raise MalformedInputError(
                f"{bad} (use --skip-bad to count and skip malformed lines)"
            ) from None
        self.result.bad.append(bad)


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding=encoding, newline="") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line.strip():
                yield lineno, line


# --- field checks ------------------------------------------------------------------------


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _Bad(f"{what} must be an integer")
    if isinstance(value, float):
        return int(value)
    if not isinstance(value, (int, str)):
        raise _Bad(f"{what} must be an integer")
    try:
        return int(str(value).strip())
    except ValueError:
        raise _Bad(f"{what} must be an integer") from None


def _timestamp(value: Any, what: str) -> int:
    ts = _int(value, what)
    if not 0 <= ts < MAX_TIMESTAMP:
        raise _Bad(f"{what} must be UTC seconds from 0 to 2^40")
    return ts


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(f"{what} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise _Bad(f"{what} must be a number") from None
    if not math.isfinite(number):
        raise _Bad(f"{what} must be finite")
    return number


def _id(value: Any, what: str) -> str:
    """Ids are strings or integers (never lists, objects, booleans or floats)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f"{what} must be a string or an integer")
    text = str(value).strip()
    if not text:
        raise _Bad(f"{what} is empty")
    if len(text) > MAX_ID_CHARS:
        raise _Bad(f"{what} is longer than {MAX_ID_CHARS} characters")
    return text


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string")
    return value


def _checked(event: Event, raw_chars: int) -> Event:
    """The store's record-size check, done exactly only where the line could exceed it."""
    if len(event.event_id) > MAX_ID_CHARS:
        raise _Bad(
            f"event_id (given or made of the record's ids) is longer than {MAX_ID_CHARS} characters"
        )
    if raw_chars >= _EXACT_SIZE_FROM:
        try:
            size = len(
                _to_json([event.event_id, event.item_id, event.timestamp, event.fields]).encode()
            )
        except (TypeError, ValueError):
            raise _Bad(
                "fields must be JSON values (string, finite number, boolean, list, object)"
            ) from None
        if size > MAX_PAYLOAD_BYTES:
            raise _Bad(f"record is over the store's {MAX_PAYLOAD_BYTES}-byte limit")
    return event


# --- MovieLens-1M ------------------------------------------------------------------------


def _find_ratings(root: Path) -> Path:
    if (root / "ratings.dat").is_file():
        return root / "ratings.dat"
    found = sorted(root.glob("ratings*.dat"))
    if not found:
        raise FileNotFoundError(f"no ratings.dat (or ratings*.dat) in {root}")
    return found[0]


def read_movielens_movies(path: Path, collector: _Collector) -> dict[str, tuple[str, list[str]]]:
    movies: dict[str, tuple[str, list[str]]] = {}

    def parse(line: str) -> None:
        parts = line.split("::")
        if len(parts) != 3:
            raise _Bad(f"expected MovieID::Title::Genres, got {len(parts)} fields")
        movie_id = _id(_int(parts[0], "MovieID"), "MovieID")
        title = parts[1].strip()
        if not title:
            raise _Bad("Title is empty")
        if len(line) >= _EXACT_SIZE_FROM:
            raise _Bad("line is too long for a movie")
        movies[movie_id] = (title, [g for g in parts[2].split("|") if g])

    for lineno, line in _lines(path, "latin-1"):
        collector.line(path, lineno, lambda: parse(line))
    return movies


def read_movielens(root: Path, skip_bad: bool = False) -> ReadResult:
    """ratings.dat (UserID::MovieID::Rating::Timestamp) joined with movies.dat, latin-1."""
    root = Path(root)
    if root.is_file():
        root = root.parent
    collector = _Collector(skip_bad)
    movies_path = root / "movies.dat"
    if not movies_path.is_file():
        raise FileNotFoundError(f"no movies.dat in {root}")
    movies = read_movielens_movies(movies_path, collector)
    ratings_path = _find_ratings(root)

    def parse(line: str) -> Event:
        parts = line.split("::")
        if len(parts) != 4:
            raise _Bad(f"expected UserID::MovieID::Rating::Timestamp, got {len(parts)} fields")
        user, movie = (
            _id(_int(parts[0], "UserID"), "UserID"),
            _id(_int(parts[1], "MovieID"), "MovieID"),
        )
        rating, ts = _int(parts[2], "Rating"), _timestamp(parts[3], "Timestamp")
        if not 1 <= rating <= 5:
            raise _Bad("Rating must be 1..5")
        if movie not in movies:
            raise _Bad("MovieID is not in movies.dat")
        title, genres = movies[movie]
        # Titles are bounded when movies.dat is read, so the payload needs no exact check here.
        return _checked(
            Event(
                f"ml:{user}:{movie}",
                user,
                movie,
                ts,
                {"rating": rating, "genres": list(genres), "title": title},
            ),
            0,
        )

    for lineno, line in _lines(ratings_path, "latin-1"):
        collector.line(ratings_path, lineno, lambda: parse(line))
    return collector.result


# --- JSON lines ----------------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Bad("numbers must be finite")
    return value


def _no_constant(_name: str) -> Any:
    raise _Bad("numbers must be finite (NaN and Infinity are not JSON)")


def _json_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise _Bad(f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_amazon(path: Path, skip_bad: bool = False) -> ReadResult:
    """Amazon reviews 5-core: reviewerID, asin, overall, unixReviewTime, reviewText, summary."""
    path = Path(path)
    collector = _Collector(skip_bad)

    def parse(line: str) -> Event:
        obj = _json_object(line)
        user, item = _id(obj["reviewerID"], "reviewerID"), _id(obj["asin"], "asin")
        ts = _timestamp(obj["unixReviewTime"], "unixReviewTime")
        rating = _number(obj["overall"], "overall")
        if not 1.0 <= rating <= 5.0:
            raise _Bad("overall must be 1..5")
        fields = {
            "rating": rating,
            "text": _text(obj.get("reviewText"), "reviewText"),
            "summary": _text(obj.get("summary"), "summary"),
        }
        return _checked(Event(f"az:{user}:{item}:{ts}", user, item, ts, fields), len(line))

    for lineno, line in _lines(path, "utf-8"):
        collector.line(path, lineno, lambda: parse(line))
    return collector.result


def _generic_event(obj: dict[str, Any], raw_chars: int) -> Event:
    """{event_id?, user_id, item_id, timestamp, fields? | other keys as fields}."""
    user = _id(obj["user_id"], "user_id")
    item = _id(obj["item_id"], "item_id")
    ts = _timestamp(obj["timestamp"], "timestamp")
    if "fields" in obj:
        if not isinstance(obj["fields"], dict):
            raise _Bad("fields must be an object")
        fields = dict(obj["fields"])
    else:
        fields = {
            k: v for k, v in obj.items() if k not in ("event_id", "user_id", "item_id", "timestamp")
        }
    event_id = obj.get("event_id")
    event_id = _id(event_id, "event_id") if event_id is not None else f"{user}:{item}:{ts}"
    return _checked(Event(event_id, user, item, ts, fields), raw_chars)


def read_jsonl(path: Path, skip_bad: bool = False) -> ReadResult:
    path = Path(path)
    collector = _Collector(skip_bad)
    for lineno, line in _lines(path, "utf-8"):
        collector.line(path, lineno, lambda: _generic_event(_json_object(line), len(line)))
    return collector.result


def _csv_value(text: str) -> Any:
    """CSV cells are text: finite numbers become numbers, `a|b` becomes a list."""
    if "|" in text:
        return [part for part in text.split("|") if part]
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        return value if cast is int or math.isfinite(value) else text
    return text


def read_csv(path: Path, skip_bad: bool = False) -> ReadResult:
    """A header row naming user_id, item_id, timestamp (event_id optional); other columns are fields."""
    path = Path(path)
    collector = _Collector(skip_bad)
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return collector.result
        header = [h.strip() for h in header]
        missing = {"user_id", "item_id", "timestamp"} - set(header)
        if missing:
            raise MalformedInputError(f"{path}:1: header lacks {', '.join(sorted(missing))}")
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue

            def parse(row: list[str] = row) -> Event:
                if len(row) != len(header):
                    raise _Bad(f"expected {len(header)} columns, got {len(row)}")
                obj: dict[str, Any] = {}
                for name, cell in zip(header, row):
                    obj[name] = (
                        cell
                        if name in ("event_id", "user_id", "item_id", "timestamp")
                        else _csv_value(cell)
                    )
                return _generic_event(obj, sum(len(c) for c in row))

            collector.line(path, lineno, parse)
    return collector.result


def read_events(path: str | Path, fmt: str, *, skip_bad: bool = False) -> ReadResult:
    """Read a source in one of FORMATS. Histories are ordered later (`group_by_user`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    readers = {
        "movielens": read_movielens,
        "amazon": read_amazon,
        "jsonl": read_jsonl,
        "csv": read_csv,
    }
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "movielens" and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the {fmt} format reads one file")
    result = readers[fmt](path, skip_bad)
    if not result.events:
        skipped = f" ({len(result.bad)} malformed lines skipped)" if result.bad else ""
        raise EmptyInputError(f"no events in {path}{skipped}")
    return result
