"""Running the blocking store and encoder work of the user routes (events, embedding, refresh,
recommendations, similar users) off the event loop, with the request timeout, and answering with
the response model serialized once.

Why not FastAPI's plain `def` routes: those hop through anyio's worker threads (a capacity
limiter and cancel scopes per call) and then validate the returned model a second time; on the
read path (embedding, recommendations, similar users) that bookkeeping cost more than the store
read itself. Here the call goes to the app's own thread pool (`app.state.pool`), the wait is
bounded by `request_timeout_s` (504 past it; the store call still runs to its end in its
thread: harmless for a read, and for an ingest a retry is idempotent), and the answer is the
pydantic model's own JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request, Response
from pydantic import BaseModel

T = TypeVar("T")


async def offload(request: Request, fn: Callable[..., T], *args) -> T:  # noqa: ANN002
    """`fn(*args)` in the app's read pool; TimeoutError (504 at the edge) past the request
    timeout."""
    app = request.app
    # asyncio.timeout, not wait_for: no extra task per request on the read path.
    async with asyncio.timeout(app.state.settings.request_timeout_s):
        return await asyncio.get_running_loop().run_in_executor(app.state.pool, fn, *args)


def model_response(model: BaseModel) -> Response:
    """The model as its JSON body (FastAPI sends a Response as is: no second validation). The
    route still declares `response_model`, so the OpenAPI spec shows the same shape."""
    return Response(model.model_dump_json(), media_type="application/json")
