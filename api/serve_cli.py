"""Subcommand: serve (the HTTP service under uvicorn; see api/service/)."""
from __future__ import annotations

import argparse
import json
import logging

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
    add_quantize_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.service import Settings, create_app

    overrides = {k: v for k in ("host", "port", "adapter", "model", "encoder", "quantize")
                 if (v := getattr(args, k)) is not None}
    settings = Settings.load(args.config, **overrides)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    print(json.dumps({"event": "serve", "host": settings.host, "port": settings.port}), flush=True)
    # uvicorn's access log prints paths, and paths hold user ids: ours logs route templates.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                access_log=False, log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0
