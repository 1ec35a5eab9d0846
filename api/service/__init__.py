"""The HTTP service (`userllm serve`): FastAPI routers over the one personalization path.

    from api.service import Settings, create_app
    app = create_app(Settings(adapter="runs/adapter"))       # or Settings.load("serve.toml")

Layout: settings (env + TOML), app (factory, lifespan), edge (ASGI middleware: request ids,
security headers, body limit, content types, rate limit, access log), auth (API keys and
scopes), errors (one JSON error body), schemas (pydantic models of the OpenAPI spec), routes
(thin: parse, call, shape), metrics (Prometheus). Business logic lives in api/userops.py and
api/personalize.py, never in a route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.service.app import create_app
    from api.service.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: `userllm admin create-key` reads the scopes from api.service.settings and must not
    # pay for FastAPI, torch and the engine on the way.
    if name == "create_app":
        from api.service.app import create_app

        return create_app
    if name == "Settings":
        from api.service.settings import Settings

        return Settings
    raise AttributeError(name)
