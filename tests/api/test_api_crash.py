"""Crash safety through the API: `userllm serve` is killed with SIGKILL while a batch of events
sits inside its open transaction, then restarted. Every acknowledged event is there, the batch
in flight is there whole or not at all (one transaction per request), and re-sending it
duplicates nothing."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from api_helpers import make_keys, subprocess_env as _env

pytestmark = pytest.mark.xdist_group("api")
BATCH = 25


def _start(env: dict, port: int) -> subprocess.Popen:
    cli = [sys.executable, "-c", "import sys, api.cli as c; "
           "c.COMMAND_MODULES = ('api.store_cli', 'api.serve_cli'); sys.exit(c.main())"]
    proc = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def _batch(n: int) -> list[dict]:
    return [{"event_id": f"b{n}-e{i}", "user_id": f"user-{i % 5}", "item_id": f"i{i}",
             "timestamp": 1_600_000_000 + n * 100 + i, "fields": {"rating": 1 + i % 5}}
            for i in range(BATCH)]


def test_kill_9_during_ingest_loses_and_duplicates_nothing(backend):
    keys = make_keys(backend)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {keys['events:write']}"}
    env = _env(backend) | {"USERLLM_TEST_BATCH_DELAY": "0.3", "USERLLM_RATE_LIMIT": ""}
    proc = _start(env, port)
    acked, n = [], 0
    try:
        for n in range(3):
            r = httpx.post(f"{url}/v1/events", json={"events": _batch(n)}, headers=auth, timeout=60)
            assert r.status_code == 200 and r.json()["inserted"] == BATCH, r.text
            acked.append(n)
        n += 1
        in_flight = threading.Thread(target=lambda: _post_quietly(url, _batch(n), auth))
        in_flight.start()
        time.sleep(0.15)  # inside the batch's open transaction (held 0.3 s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        in_flight.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    from store import Store

    with Store.open(backend[1], backend[2], backend[3]) as store:
        stored = {e.event_id for u in range(5) for e in store.history(f"user-{u}")}
    acked_ids = {e["event_id"] for b in acked for e in _batch(b)}
    flight_ids = {e["event_id"] for e in _batch(n)}
    assert acked_ids <= stored
    assert stored - acked_ids in (set(), flight_ids)  # the request in flight: whole or nothing

    proc = _start(env | {"USERLLM_TEST_BATCH_DELAY": ""}, port)
    try:
        r = httpx.post(f"{url}/v1/events", json={"events": _batch(n)}, headers=auth, timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["inserted"] + body["duplicates"] == BATCH, r.text
        assert body["duplicates"] == (BATCH if stored - acked_ids else 0)
    finally:
        proc.terminate()
        proc.wait(60)
    with Store.open(backend[1], backend[2], backend[3]) as store:
        events = [e.event_id for u in range(5) for e in store.history(f"user-{u}")]
    assert len(events) == len(set(events)) == len(acked_ids | flight_ids)


def _post_quietly(url: str, events: list[dict], auth: dict) -> None:
    try:
        httpx.post(f"{url}/v1/events", json={"events": events}, headers=auth, timeout=30)
    except httpx.TransportError:
        pass  # the server died under it: never acknowledged
