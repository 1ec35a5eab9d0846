"""`userllm admin create-key` (scopes checked, key shown once and working) and `userllm serve`
as an operator runs it: a subprocess configured by a TOML file and the environment, with two
worker processes."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from api_helpers import subprocess_env as _env

pytestmark = pytest.mark.xdist_group("api")


def test_create_key_checks_scopes_and_serve_runs_from_toml(sqlite_backend, tmp_path):
    env = _env(sqlite_backend)
    cli = [sys.executable, "-c", "import sys, api.cli as c; "
           "c.COMMAND_MODULES = ('api.store_cli', 'api.serve_cli'); sys.exit(c.main())"]
    bad = subprocess.run([*cli, "admin", "create-key", "--scopes", "read"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown scopes" in bad.stderr
    made = subprocess.run([*cli, "admin", "create-key", "--scopes", "admin"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("ulk_") and "only its hash is kept" in made.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nthreads = 1\nrate_limit = "1000/minute"\n')
    # Two worker processes: the settings file and the command line reach both.
    proc = subprocess.Popen([*cli, "serve", "--config", str(config), "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        assert httpx.get(f"{url}/readyz").json()["checks"] == {
            "store": "ok", "model": "not configured", "encoder": "not configured", "rate_limit": "ok"}
        r = httpx.get(f"{url}/v1/admin/audit", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "api-key.created" in {e["action"] for e in r.json()["entries"]}
        spec = httpx.get(f"{url}/openapi.json").json()
        assert "/v1/chat/completions" in spec["paths"] and "/v1/admin/users/{user_id}" in spec["paths"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -15) and out.count("Application shutdown complete") == 2, out
    assert '"workers": 2' in out
    assert "ulk_" not in out
