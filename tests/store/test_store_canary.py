"""Planted canaries (titles, review text, external user ids) never reach the disk in clear: not in
the raw SQLite files (WAL checkpointed), not in a pg_dump, not in the FAISS files, not in logs or
command output."""
import json
import logging
import subprocess

import numpy as np
from sqlalchemy import text

from store import Store
from store_helpers import cli_command, pg_dump_schema, subprocess_env
from userenc.events import Event

CANARIES = ["CanaryUser-7f3aQ", "CanaryGone-5e1bX", "CanaryTitle-91bdZ", "CanaryText-c0deW", "CanarySummary-44aaV", "CanaryItem-a1b2"]


def _files_under(path):
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


def test_canaries_appear_nowhere_at_rest_or_in_logs(backend, kek_b64, tmp_path, caplog):
    name, data_url, keys_url, home = backend
    caplog.set_level(logging.DEBUG)
    amazon = tmp_path / "reviews.json"
    reviews = [
        {"reviewerID": user, "asin": f"B000{i}", "overall": 4.0, "unixReviewTime": 1_400_000_000 + i, "reviewText": f"{CANARIES[3]} loved it", "summary": CANARIES[4]}
        for user in CANARIES[:2]
        for i in range(5)
    ]
    amazon.write_text("".join(json.dumps(r) + "\n" for r in reviews))
    assert CANARIES[0].encode() in amazon.read_bytes()  # the input does carry them
    env = subprocess_env(backend, kek_b64)
    outputs = []
    for args in (
        ["ingest", "--data", str(amazon), "--format", "amazon", "-v"],
        ["admin", "delete-user", CANARIES[1]],
        ["admin", "verify-deleted", CANARIES[1]],
        ["admin", "audit-verify"],
    ):
        r = subprocess.run(cli_command() + args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outputs += [r.stdout, r.stderr]

    import base64

    from privacy import LocalKek

    s = Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({1: base64.b64decode(kek_b64)}), create=True)
    s.ingest([Event("jl-1", CANARIES[0], CANARIES[5], 1_500_000_000, {"title": CANARIES[2], "genres": ["Drama"]})])
    s.put_embeddings({CANARIES[0]: np.ones(8, dtype=np.float32)}, "enc-canary")
    hist = s.history(CANARIES[0])
    assert len(hist) == 6 and hist[-1].fields["title"] == CANARIES[2]  # readable through the store
    assert s.similar_users(CANARIES[0], k=3) == []
    assert [u for u, _ in s.histories()] == [CANARIES[0]]
    if name == "sqlite":
        for engine in (s.data, s.keys_engine):
            with engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        s.close()
        dumped = b"".join(p.read_bytes() for p in _files_under(home))
        assert (home / "store.db").stat().st_size > 10_000  # the data is really in there
    else:
        s.close()
        dumped = b""
        for i, url in enumerate((data_url, keys_url)):
            out = tmp_path / f"dump{i}.sql"
            pg_dump_schema(url, out)
            dumped += out.read_bytes()
        assert b"COPY" in dumped and b"events" in dumped
        dumped += b"".join(p.read_bytes() for p in _files_under(home))
    logs = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(outputs)
    for canary in CANARIES:
        for form in (canary.encode(), canary.encode("utf-16-le"), canary.lower().encode()):
            assert form not in dumped, f"{canary} found at rest"
        assert canary not in logs and canary.lower() not in logs.lower(), f"{canary} found in logs/output"
