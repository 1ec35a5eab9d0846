"""Readers for event sources: MovieLens-1M, Amazon 5-core JSON lines, generic JSONL and CSV.

Every reader yields `Event`s. A malformed line raises `MalformedInputError` naming the file and
line; with `skip_bad=True` it is counted in `ReadResult.bad` instead. Nothing is dropped
silently.
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


class MalformedInputError(ValueError):
    """A line that cannot be read; the message names the file and the line number."""


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
        except (ValueError, KeyError, TypeError, IndexError) as err:
            reason = str(err) if not isinstance(err, KeyError) else f"missing field {err}"
            bad = BadLine(str(path), lineno, reason)
            if not self.skip_bad:
                raise MalformedInputError(f"{bad} (use --skip-bad to count and skip malformed lines)") from None
            self.result.bad.append(bad)
            return
        if event is not None:
            self.result.events.append(event)


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding=encoding, newline="") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line.strip():
                yield lineno, line


# Messages name the file, line and field but never echo the value: a malformed line may hold
# personal data, and these messages reach stderr and logs.


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{what} must be an integer")
    if isinstance(value, float):
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what} must be an integer") from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite")
    return number


def _nonempty(value: Any, what: str) -> str:
    text = str(value).strip() if value is not None else ""
    if not text:
        raise ValueError(f"{what} is empty")
    return text


# --- MovieLens-1M ------------------------------------------------------------------------


def _find_ratings(root: Path) -> Path:
    for name in ("ratings.dat",):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("ratings*.dat"))
    if not found:
        raise FileNotFoundError(f"no ratings.dat (or ratings*.dat) in {root}")
    return found[0]


def read_movielens_movies(path: Path, collector: _Collector) -> dict[str, tuple[str, list[str]]]:
    movies: dict[str, tuple[str, list[str]]] = {}

    def parse(line: str) -> None:
        parts = line.split("::")
        if len(parts) != 3:
            raise ValueError(f"expected MovieID::Title::Genres, got {len(parts)} fields")
        movie_id = str(_int(parts[0], "MovieID"))
        genres = [g for g in parts[2].split("|") if g]
        movies[movie_id] = (_nonempty(parts[1], "Title"), genres)

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
            raise ValueError(f"expected UserID::MovieID::Rating::Timestamp, got {len(parts)} fields")
        user, movie = str(_int(parts[0], "UserID")), str(_int(parts[1], "MovieID"))
        rating, ts = _int(parts[2], "Rating"), _int(parts[3], "Timestamp")
        if not 1 <= rating <= 5:
            raise ValueError(f"Rating must be 1..5, got {rating}")
        if movie not in movies:
            raise ValueError(f"MovieID {movie} is not in movies.dat")
        title, genres = movies[movie]
        return Event(f"ml:{user}:{movie}", user, movie, ts, {"rating": rating, "genres": list(genres), "title": title})

    for lineno, line in _lines(ratings_path, "latin-1"):
        collector.line(ratings_path, lineno, lambda: parse(line))
    return collector.result


# --- JSON lines ----------------------------------------------------------------------------


def _json_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_amazon(path: Path, skip_bad: bool = False) -> ReadResult:
    """Amazon reviews 5-core: reviewerID, asin, overall, unixReviewTime, reviewText, summary."""
    path = Path(path)
    collector = _Collector(skip_bad)

    def parse(line: str) -> Event:
        obj = _json_object(line)
        user, item = _nonempty(obj["reviewerID"], "reviewerID"), _nonempty(obj["asin"], "asin")
        ts = _int(obj["unixReviewTime"], "unixReviewTime")
        rating = _number(obj["overall"], "overall")
        if not 1.0 <= rating <= 5.0:
            raise ValueError(f"overall must be 1..5, got {rating}")
        fields = {"rating": rating, "text": str(obj.get("reviewText") or ""), "summary": str(obj.get("summary") or "")}
        return Event(f"az:{user}:{item}:{ts}", user, item, ts, fields)

    for lineno, line in _lines(path, "utf-8"):
        collector.line(path, lineno, lambda: parse(line))
    return collector.result


def _generic_event(obj: dict[str, Any]) -> Event:
    """{event_id?, user_id, item_id, timestamp, fields? | other keys as fields}."""
    user = _nonempty(obj["user_id"], "user_id")
    item = _nonempty(obj["item_id"], "item_id")
    ts = _int(obj["timestamp"], "timestamp")
    if ts < 0:
        raise ValueError(f"timestamp must be >= 0, got {ts}")
    if "fields" in obj:
        if not isinstance(obj["fields"], dict):
            raise ValueError("fields must be an object")
        fields = dict(obj["fields"])
    else:
        fields = {k: v for k, v in obj.items() if k not in ("event_id", "user_id", "item_id", "timestamp")}
    event_id = obj.get("event_id")
    event_id = _nonempty(event_id, "event_id") if event_id is not None else f"{user}:{item}:{ts}"
    return Event(event_id, user, item, ts, fields)


def read_jsonl(path: Path, skip_bad: bool = False) -> ReadResult:
    path = Path(path)
    collector = _Collector(skip_bad)
    for lineno, line in _lines(path, "utf-8"):
        collector.line(path, lineno, lambda: _generic_event(_json_object(line)))
    return collector.result


def _csv_value(text: str) -> Any:
    """CSV cells are text: numbers become numbers, `a|b` becomes a list."""
    if "|" in text:
        return [part for part in text.split("|") if part]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
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
                    raise ValueError(f"expected {len(header)} columns, got {len(row)}")
                obj: dict[str, Any] = {}
                for name, cell in zip(header, row):
                    obj[name] = cell if name in ("event_id", "user_id", "item_id", "timestamp") else _csv_value(cell)
                return _generic_event(obj)

            collector.line(path, lineno, parse)
    return collector.result


def read_events(path: str | Path, fmt: str, *, skip_bad: bool = False) -> ReadResult:
    """Read a source in one of FORMATS. Histories are ordered later (`group_by_user`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    readers = {"movielens": read_movielens, "amazon": read_amazon, "jsonl": read_jsonl, "csv": read_csv}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "movielens" and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the {fmt} format reads one file")
    return readers[fmt](path, skip_bad)
