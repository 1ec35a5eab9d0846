"""Crash safety with real processes: `kill -9` an ingest mid-batch and an erasure mid-chunk, then
re-run. USERLLM_TEST_BATCH_DELAY holds each batch's transaction open for a moment, so the kill
lands inside a batch deterministically (we kill only after seeing acknowledged batches)."""
import json
import os
import signal
import subprocess
import time

from sqlalchemy import func, select

from store import Store, verify_deleted
from store.models import ErasureRequest, EventRow
from store_helpers import cli_command, make_events, subprocess_env

BATCH = 20


def _start(backend, kek_b64, args, delay="0.05"):
    env = subprocess_env(backend, kek_b64, USERLLM_TEST_BATCH_DELAY=delay)
    return subprocess.Popen(cli_command(full=True) + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def _kill_after(proc, marker: str, count: int, timeout: float = 60.0) -> list[str]:
    """Read stdout until `count` lines contain marker, then SIGKILL; returns every line printed."""
    lines, seen, deadline = [], 0, time.monotonic() + timeout
    while seen < count:
        line = proc.stdout.readline()
        assert line, f"process ended before {count} x {marker!r}: {lines} {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for progress"
        lines.append(line)
        seen += marker in line
    time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    lines += proc.stdout.read().splitlines(keepends=True)  # anything acknowledged before the kill
    assert proc.returncode == -signal.SIGKILL
    return lines


def _open(backend, kek_b64):
    import base64

    from privacy import LocalKek

    _, data_url, keys_url, home = backend
    return Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({1: base64.b64decode(kek_b64)}), create=True)


def _event_count(store):
    with store.data.connect() as conn:
        return conn.execute(select(func.count()).select_from(EventRow)).scalar_one()


def test_kill_9_mid_ingest_then_rerun_loses_and_duplicates_nothing(backend, kek_b64, tmp_path):
    events = make_events(3, 200)
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    args = ["ingest", "--data", str(data), "--format", "jsonl", "--batch-size", str(BATCH), "-v"]
    lines = _kill_after(_start(backend, kek_b64, args), "committed", 4)
    acked = max(int(line.split()[1]) for line in lines if "committed" in line)
    store = _open(backend, kek_b64)
    stored = _event_count(store)
    # Every acknowledged batch is there; the batch in flight was rolled back as a whole.
    assert acked * BATCH <= stored < len(events) and stored % BATCH == 0, (acked, stored)
    acknowledged = events[: acked * BATCH]
    for user in {e.user_id for e in acknowledged}:
        have = {e.event_id for e in store.history(user)}
        assert {e.event_id for e in acknowledged if e.user_id == user} <= have
    store.close()

    rerun = subprocess.run(cli_command(full=True) + args, env=subprocess_env(backend, kek_b64), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"ingested {len(events) - stored} new events ({stored} already stored" in rerun.stdout
    store = _open(backend, kek_b64)
    assert _event_count(store) == len(events)
    for u in ("u0", "u1", "u2"):
        assert store.history(u) == sorted([e for e in events if e.user_id == u], key=lambda e: e.timestamp)
    store.close()


def test_kill_9_mid_erasure_then_rerun_completes(backend, kek_b64):
    store = _open(backend, kek_b64)
    store.ingest(make_events(2, 300))
    store.close()
    args = ["admin", "delete-user", "u0", "--batch-size", str(BATCH)]
    _kill_after(_start(backend, kek_b64, args), "events-chunk", 3)
    store = _open(backend, kek_b64)
    with store.data.connect() as conn:
        req = conn.execute(select(ErasureRequest.status, ErasureRequest.steps)).one()
    steps = json.loads(req.steps)
    assert req.status == "running" and steps["tombstone"] == "done" and steps["data_key"] == "done" and steps["events"] == "pending"
    assert 0 < store.keys.tombstones().__len__() and 0 < _event_count(store) - 300 < 300 - 3 * BATCH + 1
    store.close()

    env = subprocess_env(backend, kek_b64)
    again = subprocess.run(cli_command(full=True) + args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "(resumed)" in again.stdout, again.stderr
    store = _open(backend, kek_b64)
    v = verify_deleted(store, "u0")
    assert v.clean and v.tombstone, v.remaining
    assert _event_count(store) == 300 and len(store.history("u1")) == 300
    assert store.audit_report().problems == []
    store.close()
