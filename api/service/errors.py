"""One error body for every failure, in the OpenAI shape the `openai` client reads:

    {"error": {"type": "not_found", "message": "...", "request_id": "..."}}

Messages never carry record contents or user ids."""

from __future__ import annotations

import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("userllm.api")

TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str, request_id: str | None) -> dict:
    return {
        "error": {
            "type": TYPES.get(status, "error"),
            "message": message,
            "request_id": request_id,
        }
    }


def error_response(status: int, message: str, request_id: str | None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, request_id), status_code=status,
                        headers=headers)


def _rid(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, _rid(request), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else TYPES.get(exc.status_code, "error")
        return error_response(exc.status_code, message, _rid(request),
                              dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and what kind, never the offending value (it may be personal data).
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()[:5]]
        return error_response(422, "; ".join(parts) or "invalid request", _rid(request))


def log_bug(exc: BaseException, scope: dict) -> None:
    """An unhandled exception: its type, the route template and the frames, never its message
    (an exception's text may quote personal data)."""
    route = getattr(scope.get("route"), "path", "unmatched")
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s on %s\n%s", type(exc).__name__, route, frames)
