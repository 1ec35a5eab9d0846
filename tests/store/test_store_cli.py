"""`userllm ingest` and `userllm admin ...` as real processes: clear one-line errors with exit
status 2, and nothing changed, for malformed input and unknown users."""
import json
import subprocess

from store import Store
from store_helpers import all_rows, cli_command, subprocess_env


def _run(env, *args):
    return subprocess.run(cli_command() + list(args), env=env, capture_output=True, text=True, timeout=120)


def _snapshot(backend, kek_b64):
    import base64

    from privacy import LocalKek

    _, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({1: base64.b64decode(kek_b64)}), create=True)
    snap = (all_rows(s.data), all_rows(s.keys_engine), sorted(p.name for p in (home / "index").iterdir()))
    s.close()
    return snap


def _movielens(folder):
    folder.mkdir()
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n", encoding="latin-1")
    (folder / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978300761\n2::1::4::978300762\n", encoding="latin-1")
    return folder


def test_cli_ingest_and_malformed_inputs_change_nothing(backend, kek_b64, tmp_path):
    name = backend[0]
    env = subprocess_env(backend, kek_b64)
    ok = _run(env, "ingest", "--data", str(_movielens(tmp_path / "ml")), "--format", "movielens")
    assert ok.returncode == 0 and "ingested 3 new events" in ok.stdout, ok.stderr
    before = _snapshot(backend, kek_b64)

    good = {"user_id": "7", "item_id": "i", "timestamp": 5, "fields": {"rating": 3}}
    bad_line = tmp_path / "bad_line.jsonl"
    bad_line.write_text(json.dumps(good) + "\n{not json\n")
    wrong_type = tmp_path / "wrong_type.jsonl"
    wrong_type.write_text(json.dumps({**good, "timestamp": "yesterday"}) + "\n")
    oversized = tmp_path / "oversized.jsonl"
    oversized.write_text(json.dumps(good) + "\n" + json.dumps({**good, "item_id": "j", "fields": {"text": "x" * 70_000}}) + "\n")
    cases = [
        (["ingest", "--data", str(oversized), "--format", "jsonl"], "oversized.jsonl:2: record is over"),
        (["admin", "delete-user", "no-such-user"], "unknown user"),
    ]
    if name == "sqlite":  # the reader errors below happen before any database is touched
        cases += [
            (["ingest", "--data", str(bad_line), "--format", "jsonl"], "bad_line.jsonl:2: invalid JSON"),
            (["ingest", "--data", str(wrong_type), "--format", "jsonl"], "wrong_type.jsonl:1: timestamp must be an integer"),
            (["ingest", "--data", str(tmp_path / "missing"), "--format", "movielens"], "no such file or folder"),
        ]
    for args, message in cases:
        r = _run(env, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "x" * 100 not in r.stderr
        assert _snapshot(backend, kek_b64) == before, f"{args} changed the store"

    r = _run(env, "ingest", "--data", str(bad_line), "--format", "jsonl", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size: must be at least 1" in r.stderr

    skipped = _run(env, "ingest", "--data", str(bad_line), "--format", "jsonl", "--skip-bad")
    assert skipped.returncode == 0 and "ingested 1 new events" in skipped.stdout and "skipped 1 malformed lines (" in skipped.stderr
    assert "{not json" not in skipped.stderr
