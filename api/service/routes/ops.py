"""Liveness, readiness and Prometheus metrics (no key needed: bind the service to a private
address or put the scraper beside it)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from api.service.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


def _checks(request: Request) -> dict[str, str]:
    state, checks = request.app.state, {}
    try:
        with state.ops.store.data.connect() as conn:
            conn.execute(text("SELECT 1"))
        with state.ops.store.keys_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["store"] = "ok"
    except Exception as err:  # noqa: BLE001 - reported, not raised
        checks["store"] = f"unavailable ({type(err).__name__})"
    checks["model"] = "ok" if state.engine is not None else "not configured"
    checks["encoder"] = "ok" if state.ops.encoder is not None else "not configured"
    return checks


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="The store (and rate-limit storage) answer; which models are loaded")
async def readyz(request: Request) -> JSONResponse:
    checks = await asyncio.to_thread(_checks, request)
    limiter = request.app.state.limiter
    if limiter is not None:
        try:
            checks["rate_limit"] = "ok" if await limiter.check_storage() else "unavailable"
        except Exception as err:  # noqa: BLE001 - reported, not raised
            checks["rate_limit"] = f"unavailable ({type(err).__name__})"
    ready = checks["store"] == "ok" and checks.get("rate_limit", "ok") == "ok"
    body = Health(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
