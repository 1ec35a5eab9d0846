"""Helpers shared by the store tests (a unique module name: tests folders are not packages)."""
from __future__ import annotations

import os
from pathlib import Path


def make_events(n_users: int, per_user: int, prefix: str = "u", title: str = "A Film (1999)"):
    from userenc.events import Event

    return [
        Event(f"ev:{prefix}{u}:{i}", f"{prefix}{u}", f"m{i % 50}", 1_000_000 + i * 60 + u, {"rating": 1 + (i + u) % 5, "title": title, "genres": ["Drama"]})
        for u in range(n_users)
        for i in range(per_user)
    ]


def subprocess_env(backend, kek_b64: str, **extra: str) -> dict[str, str]:
    """Environment for `python -m api.cli ...` against the same databases and KEK."""
    _, data_url, keys_url, home = backend
    env = dict(os.environ)
    env.update(USERLLM_HOME=str(home), USERLLM_DATABASE_URL=data_url, USERLLM_KEYS_DATABASE_URL=keys_url, USERLLM_KEK=kek_b64)
    env.pop("USERLLM_KEK_FILE", None)
    env.update(extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def cli_command() -> list[str]:
    """`python -m api.cli`; while a module api.cli lists is not written yet (another engineer's
    area), the same api.cli.main with only the store commands registered."""
    import importlib.util
    import sys

    from api.cli import COMMAND_MODULES

    if all(importlib.util.find_spec(m) is not None for m in COMMAND_MODULES):
        return [sys.executable, "-m", "api.cli"]
    return [sys.executable, "-c", "import sys, api.cli as c; c.COMMAND_MODULES = ('api.store_cli',); sys.exit(c.main())"]
