"""Subcommand: serve (the HTTP service under uvicorn; see api/service/)."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from api.generate_cli import add_quantize_args


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Messages are ours (route templates, counts, keyed ids) or
    uvicorn's start/stop lines; a traceback is kept as frames (see api/service/errors.py)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:  # the access log already writes JSON: keep it as fields, not an escaped string
            doc = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            doc = {"message": message}
        return json.dumps({"time": round(record.created, 3), "level": record.levelname,
                           "logger": record.name, **doc})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (FastAPI under uvicorn)")
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="settings file (USERLLM_* environment variables win over it)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--adapter", default=None, help="adapter folder (chat and generate)")
    p.add_argument("--model", default=None, help="base model (default: the adapter's)")
    p.add_argument("--encoder", default=None,
                   help="encoder checkpoint for embeddings and recommendations (default: the adapter's)")
    p.add_argument("--workers", type=int, default=None,
                   help="server processes (default 1); each loads its own models")
    add_quantize_args(p)
    p.set_defaults(func=cmd_serve)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.service import Settings, create_app
    from api.service.app import CONFIG_FILE_ENV

    overrides = {k: v for k in ("host", "port", "adapter", "model", "encoder", "quantize", "workers")
                 if (v := getattr(args, k)) is not None}
    settings = Settings.load(args.config, **overrides)  # checked here, before any worker starts
    setup_logging(settings.log_level)
    print(json.dumps({"event": "serve", "host": settings.host, "port": settings.port,
                      "workers": settings.workers}), flush=True)
    # uvicorn's access log prints paths, and paths hold user ids: ours logs route templates.
    common = dict(host=settings.host, port=settings.port, access_log=False,
                  log_level=settings.log_level, timeout_graceful_shutdown=10)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return 0
    # Worker processes build their app from the environment: hand them this command's values.
    os.environ.update({f"USERLLM_{k.upper()}": str(v) for k, v in overrides.items()})
    if args.config:
        os.environ[CONFIG_FILE_ENV] = str(Path(args.config).resolve())
    uvicorn.run("api.service.app:app_from_environment", factory=True, workers=settings.workers,
                **common)
    return 0
