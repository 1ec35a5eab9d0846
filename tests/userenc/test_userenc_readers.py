"""Readers on tiny files: MovieLens-1M, Amazon 5-core JSON lines, generic JSONL and CSV.

Every malformed line either stops the read with an error naming file and line, or (skip_bad)
is counted with its line number while the good lines are kept; nothing is dropped silently."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from userenc.events import Event, group_by_user
from userenc.readers import EmptyInputError, MalformedInputError, _Collector, read_events, read_movielens_movies
from userenc_helpers import SHARED

MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Misérables, Les (1995)::Drama|Musical\n3::Heat (1995)::Action|Crime|Thriller\n"
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"


def _movielens(tmp_path: Path, ratings: str, movies: str = MOVIES) -> Path:
    root = tmp_path / "ml"
    root.mkdir(exist_ok=True)
    (root / "movies.dat").write_bytes(movies.encode("latin-1"))
    (root / "users.dat").write_bytes(USERS.encode("latin-1"))
    (root / "ratings.dat").write_text(ratings, encoding="latin-1")
    return root


def _bad(result) -> list[tuple[str, int]]:
    return [(Path(b.file).name, b.line) for b in result.bad]


def test_movielens_reads_latin1_titles_genres_and_orders_histories(tmp_path):
    ratings = "1::2::5::978300760\n1::1::3::978300700\n2::3::4::978300800\n\n1::3::4::978300760\n"
    res = read_events(_movielens(tmp_path, ratings), "movielens")
    assert res.bad == [] and len(res.events) == 4
    first = res.events[0]
    assert first == Event("ml:1:2", "1", "2", 978300760, {"rating": 5, "genres": ["Drama", "Musical"], "title": "Misérables, Les (1995)"})
    histories = group_by_user(res.events)
    assert list(histories) == ["1", "2"]  # users in first-seen order
    # Timestamp order; the tie at 978300760 keeps file order (movie 2 before movie 3).
    assert [e.item_id for e in histories["1"]] == ["1", "2", "3"]
    assert [e.timestamp for e in histories["1"]] == [978300700, 978300760, 978300760]
    # The ratings file may also be named ratings*.dat (the shared slice is), and the path may be a file in the folder.
    root = tmp_path / "ml"
    (root / "ratings.dat").rename(root / "ratings_users_0001-0002.dat")
    assert read_events(root / "movies.dat", "movielens").events == res.events


MOVIELENS_BAD = [
    ("1::2::5\n", "expected UserID::MovieID::Rating::Timestamp, got 3 fields"),
    ("x::2::5::978300760\n", "UserID must be an integer"),
    ("1::2::7::978300760\n", "Rating must be 1..5"),
    ("1::99::4::978300760\n", "MovieID is not in movies.dat"),
    ("1::2::4::soon\n", "Timestamp must be an integer"),
    ("1::2::4::-978300760\n", "Timestamp must be UTC seconds from 0 to 2^40"),
    ("1::2::4::99999999999999\n", "Timestamp must be UTC seconds from 0 to 2^40"),
]


@pytest.mark.parametrize("bad_line,reason", MOVIELENS_BAD)
def test_movielens_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    root = _movielens(tmp_path, "1::1::3::978300700\n\n" + bad_line + "2::3::4::978300800\n")
    with pytest.raises(MalformedInputError) as err:
        read_events(root, "movielens")
    assert f"{root / 'ratings.dat'}:3: {reason}" in str(err.value)
    res = read_events(root, "movielens", skip_bad=True)
    assert _bad(res) == [("ratings.dat", 3)] and reason in res.bad[0].reason
    assert [e.item_id for e in res.events] == ["1", "3"]


def test_movielens_skip_bad_counts_every_bad_line_in_both_files(tmp_path):
    movies = MOVIES + "4::No genres field\n5::Fargo (1996)::Crime\n"
    ratings = "".join(line for line, _ in MOVIELENS_BAD) + "1::1::3::978300700\n2::5::4::978300800\n"
    root = _movielens(tmp_path, ratings, movies)
    with pytest.raises(MalformedInputError, match=r"movies\.dat:4: expected MovieID::Title::Genres, got 2 fields"):
        read_events(root, "movielens")
    res = read_events(root, "movielens", skip_bad=True)
    n = len(MOVIELENS_BAD)
    assert _bad(res) == [("movies.dat", 4)] + [("ratings.dat", i) for i in range(1, n + 1)]
    assert [(e.user_id, e.item_id) for e in res.events] == [("1", "1"), ("2", "5")]
    assert f"2 events read, {n + 1} malformed lines skipped" == res.summary()


def test_movielens_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_events(tmp_path / "nope", "movielens")
    (tmp_path / "ratings.dat").write_text("1::1::3::1\n")
    with pytest.raises(FileNotFoundError, match="movies.dat"):
        read_events(tmp_path, "movielens")


def test_movielens_real_slice(tmp_path):
    """The first 2,000 ratings of the shared ML-1M slice (users 1-2999) with the real movies.dat."""
    ml = SHARED / "data" / "ml-1m"
    if not (ml / "movies.dat").is_file():
        pytest.skip(f"shared ML-1M data not available at {ml}")
    source = ml / "ratings_users_0001-2999.dat"
    with source.open(encoding="latin-1") as f:
        head = [next(f) for _ in range(2000)]
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / source.name).write_text("".join(head), encoding="latin-1")
    shutil.copy(ml / "movies.dat", root / "movies.dat")
    shutil.copy(ml / "users.dat", root / "users.dat")
    res = read_events(root, "movielens")
    assert res.bad == [] and len(res.events) == 2000
    assert res.events[0] == Event("ml:1:1193", "1", "1193", 978300760, {"rating": 5, "genres": ["Drama"], "title": "One Flew Over the Cuckoo's Nest (1975)"})
    histories = group_by_user(res.events)
    users_in_head = list(dict.fromkeys(line.split("::")[0] for line in head))
    assert list(histories) == users_in_head
    assert sum(len(h) for h in histories.values()) == 2000
    for h in histories.values():
        assert all(a.timestamp <= b.timestamp for a, b in zip(h, h[1:]))
    # movies.dat is latin-1: its accented titles decode.
    movies = read_movielens_movies(root / "movies.dat", _Collector(skip_bad=False))
    assert movies["73"] == ("Misérables, Les (1995)", ["Drama", "Musical"])
    assert movies["582"][0] == "Metisse (Café au Lait) (1993)"


# --- Amazon ----------------------------------------------------------------------------------

AMAZON_GOOD = {"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1393545600, "reviewText": "Works great", "summary": "ok"}


def test_amazon_reads_records(tmp_path):
    path = tmp_path / "reviews.json"
    second = dict(AMAZON_GOOD, asin="B02", overall=3.0, unixReviewTime=1393545000, summary=None)
    del second["reviewText"]
    path.write_text(json.dumps(AMAZON_GOOD) + "\n" + json.dumps(second) + "\n")
    res = read_events(path, "amazon")
    assert res.events[0] == Event("az:A1:B01:1393545600", "A1", "B01", 1393545600, {"rating": 5.0, "text": "Works great", "summary": "ok"})
    assert res.events[1].fields == {"rating": 3.0, "text": "", "summary": ""}
    assert [e.item_id for e in group_by_user(res.events)["A1"]] == ["B02", "B01"]


AMAZON_BAD = [
    ('{"reviewerID": "A1", "asin": ', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
    (json.dumps({k: v for k, v in AMAZON_GOOD.items() if k != "asin"}), "missing field 'asin'"),
    (json.dumps(dict(AMAZON_GOOD, overall=6)), "overall must be 1..5"),
    (json.dumps(dict(AMAZON_GOOD, unixReviewTime="yesterday")), "unixReviewTime must be an integer"),
    (json.dumps(dict(AMAZON_GOOD, overall="great")), "overall must be a number"),
    (json.dumps(dict(AMAZON_GOOD, unixReviewTime=-1)), "unixReviewTime must be UTC seconds from 0 to 2^40"),
    (json.dumps(dict(AMAZON_GOOD, reviewerID=["A1"])), "reviewerID must be a string or an integer"),
    (json.dumps(dict(AMAZON_GOOD, reviewText={"t": 1})), "reviewText must be a string"),
]


@pytest.mark.parametrize("bad_line,reason", AMAZON_BAD)
def test_amazon_malformed_line(tmp_path, bad_line, reason):
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps(AMAZON_GOOD) + "\n" + bad_line + "\n" + json.dumps(dict(AMAZON_GOOD, asin="B09")) + "\n")
    with pytest.raises(MalformedInputError) as err:
        read_events(path, "amazon")
    assert f"{path}:2: {reason}" in str(err.value)
    res = read_events(path, "amazon", skip_bad=True)
    assert _bad(res) == [("reviews.json", 2)]
    assert [e.item_id for e in res.events] == ["B01", "B09"]


# --- generic JSONL ---------------------------------------------------------------------------


def test_jsonl_with_and_without_event_id_fields_dict_or_top_level(tmp_path):
    path = tmp_path / "events.jsonl"
    rows = [
        {"event_id": "e1", "user_id": "u1", "item_id": "i1", "timestamp": 200, "fields": {"rating": 4, "genres": ["a", "b"]}},
        {"user_id": "u1", "item_id": "i2", "timestamp": 100, "rating": 2, "genres": ["c"]},
        {"user_id": 7, "item_id": 8, "timestamp": 300.0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = read_events(path, "jsonl")
    assert res.events == [
        Event("e1", "u1", "i1", 200, {"rating": 4, "genres": ["a", "b"]}),
        Event("u1:i2:100", "u1", "i2", 100, {"rating": 2, "genres": ["c"]}),
        Event("7:8:300", "7", "8", 300, {}),
    ]
    assert [e.event_id for e in group_by_user(res.events)["u1"]] == ["u1:i2:100", "e1"]


JSONL_GOOD = {"user_id": "u1", "item_id": "i1", "timestamp": 100}
JSONL_BAD = [
    ("{not json", "invalid JSON"),
    ('["u1", "i1", 100]', "expected a JSON object, got list"),
    (json.dumps({"item_id": "i1", "timestamp": 1}), "missing field 'user_id'"),
    (json.dumps(dict(JSONL_GOOD, timestamp="noon")), "timestamp must be an integer"),
    (json.dumps(dict(JSONL_GOOD, timestamp=1.5)), "timestamp must be an integer"),
    (json.dumps(dict(JSONL_GOOD, timestamp=-5)), "timestamp must be UTC seconds from 0 to 2^40"),
    (json.dumps(dict(JSONL_GOOD, timestamp=2**40)), "timestamp must be UTC seconds from 0 to 2^40"),
    (json.dumps(dict(JSONL_GOOD, fields=[1])), "fields must be an object"),
    (json.dumps(dict(JSONL_GOOD, item_id="  ")), "item_id is empty"),
    (json.dumps(dict(JSONL_GOOD, user_id=["a", "b"])), "user_id must be a string or an integer"),
    (json.dumps(dict(JSONL_GOOD, user_id={"id": 1})), "user_id must be a string or an integer"),
    (json.dumps(dict(JSONL_GOOD, user_id=True)), "user_id must be a string or an integer"),
    (json.dumps(dict(JSONL_GOOD, item_id=1.5)), "item_id must be a string or an integer"),
    (json.dumps(dict(JSONL_GOOD, user_id="u" * 257)), "user_id is longer than 256 characters"),
    (json.dumps(dict(JSONL_GOOD, event_id="e" * 300)), "event_id is longer than 256 characters"),
    ('{"user_id": "u1", "item_id": "i1", "timestamp": 1, "rating": NaN}', "numbers must be finite"),
    ('{"user_id": "u1", "item_id": "i1", "timestamp": 1, "rating": 1e400}', "numbers must be finite"),
    (json.dumps(dict(JSONL_GOOD, fields={"text": "x" * 70_000})), "record is over the store's 65536-byte limit"),
    (json.dumps(dict(JSONL_GOOD, fields={"text": "\u0001" * 12_000})), "record is over the store's 65536-byte limit"),
]


@pytest.mark.parametrize("bad_line,reason", JSONL_BAD)
def test_jsonl_malformed_line(tmp_path, bad_line, reason):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(JSONL_GOOD) + "\n\n" + bad_line + "\n" + json.dumps(dict(JSONL_GOOD, item_id="i2")) + "\n")
    with pytest.raises(MalformedInputError) as err:
        read_events(path, "jsonl")
    assert f"{path}:3: {reason}" in str(err.value) and "--skip-bad" in str(err.value)
    res = read_events(path, "jsonl", skip_bad=True)
    assert _bad(res) == [("events.jsonl", 3)]
    assert [e.item_id for e in res.events] == ["i1", "i2"]


def test_jsonl_skip_bad_counts_all_bad_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = []
    for bad, _ in JSONL_BAD:
        lines += [json.dumps(dict(JSONL_GOOD, item_id=f"i{len(lines)}")), bad]
    path.write_text("\n".join(lines) + "\n")
    res = read_events(path, "jsonl", skip_bad=True)
    assert [b.line for b in res.bad] == list(range(2, 2 * len(JSONL_BAD) + 1, 2))
    assert len(res.events) == len(JSONL_BAD) and len(res.events) + len(res.bad) == len(lines)


# --- CSV -------------------------------------------------------------------------------------


def test_csv_header_lists_and_numbers(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp,rating,genres,note\nu1,i1,200,4,a|b,hello\nu1,i2,100,3.5,c,\nu2,007,50,x,,\"quoted, comma\"\n")
    res = read_events(path, "csv")
    assert res.bad == []
    assert res.events[0] == Event("u1:i1:200", "u1", "i1", 200, {"rating": 4, "genres": ["a", "b"], "note": "hello"})
    assert res.events[1].fields == {"rating": 3.5, "genres": "c", "note": ""}
    assert res.events[2].item_id == "007" and res.events[2].fields["note"] == "quoted, comma"
    assert isinstance(res.events[0].fields["rating"], int) and isinstance(res.events[1].fields["rating"], float)
    assert [e.item_id for e in group_by_user(res.events)["u1"]] == ["i2", "i1"]


@pytest.mark.parametrize(
    "bad_row,reason",
    [("u1,i9,300,4", "expected 5 columns, got 4"), ("u1,i9,later,4,a", "timestamp must be an integer"), (",i9,300,4,a", "user_id is empty")],
)
def test_csv_malformed_row(tmp_path, bad_row, reason):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp,rating,genres\nu1,i1,100,4,a\n" + bad_row + "\nu1,i2,200,5,b\n")
    with pytest.raises(MalformedInputError) as err:
        read_events(path, "csv")
    assert f"{path}:3: {reason}" in str(err.value)
    res = read_events(path, "csv", skip_bad=True)
    assert _bad(res) == [("events.csv", 3)] and [e.item_id for e in res.events] == ["i1", "i2"]


def test_csv_bad_header_fails_even_with_skip_bad(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user,item_id,when\nu1,i1,100\n")
    for skip in (False, True):
        with pytest.raises(MalformedInputError, match=r"events\.csv:1: header lacks timestamp, user_id"):
            read_events(path, "csv", skip_bad=skip)


def test_read_events_rejects_unknown_format_and_folders(tmp_path):
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        read_events(tmp_path / "x.jsonl", "parquet")
    with pytest.raises(IsADirectoryError):
        read_events(tmp_path, "jsonl")


# --- what the store checks, checked at the edge (issue 9) --------------------------------------

SECRET = "Zq81-personal"


def test_empty_input_is_an_error(tmp_path):
    """Was: an empty file read as zero events and `ingest` created an empty store (exit 0)."""
    empty = tmp_path / "x.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EmptyInputError, match="no events in"):
        read_events(empty, "jsonl")
    (tmp_path / "h.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(EmptyInputError):
        read_events(tmp_path / "h.csv", "csv")
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text("{not json\n")
    with pytest.raises(EmptyInputError, match=r"\(1 malformed lines skipped\)"):
        read_events(all_bad, "jsonl", skip_bad=True)


@pytest.mark.parametrize(
    "line",
    [
        "1::2::{s}::978300760",  # Rating: not an integer
        "1::2::9{n}::978300760",  # Rating out of range (was echoed: "got 99")
        "1::9999{n}::4::978300760",  # unknown movie (was echoed: "MovieID 999999 ...")
        "1::2::4::-97830{n}",  # negative timestamp (was accepted, failing later in the store)
    ],
)
def test_movielens_errors_never_echo_the_value(tmp_path, line):
    marker = "".join(c for c in "31337" if c.isdigit())
    root = _movielens(tmp_path, line.format(s=SECRET, n=marker) + "\n1::1::3::978300700\n")
    with pytest.raises(MalformedInputError) as err:
        read_events(root, "movielens")
    assert "ratings.dat:1:" in str(err.value)
    assert SECRET not in str(err.value) and marker not in str(err.value).split("ratings.dat:1:")[1]
    assert len(read_events(root, "movielens", skip_bad=True).events) == 1


def test_jsonl_errors_never_echo_the_value(tmp_path):
    path = tmp_path / "e.jsonl"
    for bad in ({"user_id": [SECRET]}, {"timestamp": SECRET}, {"timestamp": -31337}, {"fields": SECRET}):
        path.write_text(json.dumps(dict(JSONL_GOOD, **bad)) + "\n" + json.dumps(JSONL_GOOD) + "\n")
        with pytest.raises(MalformedInputError) as err:
            read_events(path, "jsonl")
        assert SECRET not in str(err.value) and "31337" not in str(err.value)


def test_csv_non_finite_numbers_stay_text(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp,score\nu1,i1,5,nan\nu1,i2,6,inf\nu1,i3,7,2.5\n")
    res = read_events(path, "csv")
    assert [e.fields["score"] for e in res.events] == ["nan", "inf", 2.5]


def test_reader_limits_are_the_store_limits():
    from store import records
    from userenc import readers

    assert (readers.MAX_ID_CHARS, readers.MAX_PAYLOAD_BYTES, readers.MAX_TIMESTAMP) == (records.MAX_ID_CHARS, records.MAX_PAYLOAD_BYTES, records.MAX_TIMESTAMP)


def test_everything_a_reader_accepts_the_store_accepts(tmp_path):
    """Lines just inside every limit pass both the reader and the store's own encoder."""
    from store.records import encode_payload

    rows = [
        dict(JSONL_GOOD, event_id="e1", user_id="u" * 256, item_id=7, timestamp=2**40 - 1),
        dict(JSONL_GOOD, event_id="e" * 256, fields={"text": "x" * 60_000}),
        dict(JSONL_GOOD, fields={"n": [1e308, -0.0, 3], "nested": {"a": None}}),
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = read_events(path, "jsonl")
    assert len(res.events) == 3
    for i, e in enumerate(res.events):
        encode_payload(e, i)
