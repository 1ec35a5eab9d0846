"""The ASGI layer in front of every route (plain ASGI: it never buffers a body or a stream).

- request ids: the client's X-Request-ID when it is a short token, else a new one; echoed back
  and put in every error body and log line;
- security headers on every answer: Cache-Control no-store, nosniff, frame DENY;
- 413 before the body is read: a Content-Length over the limit is refused at once, and a body
  without one is counted as it streams in (FastAPI answers 413 from our error handler);
- 415 for a request body that is not JSON;
- 429 from the rate limiter (health, readiness and metrics are exempt); 503 while its storage
  (Redis) is unreachable: fail closed;
- one JSON access-log line per request naming the route template, never the path (paths hold
  user ids), and the request metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.service.errors import error_body, log_bug
from api.service.metrics import Metrics
from api.service.ratelimit import RateLimiter

access_log = logging.getLogger("userllm.api.access")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
UNLIMITED = {"/healthz", "/readyz", "/metrics"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


def key_id(headers: Headers) -> str | None:
    """A short hash of the request's API key (None without one): the rate limiter's key."""
    token = headers.get("authorization", "")
    token = token[7:].strip() if token[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else None


class Edge:
    def __init__(self, app: ASGIApp, max_body_bytes: int, limiter: RateLimiter | None,
                 metrics: Metrics):
        self.app, self.max_body, self.limiter, self.metrics = app, max_body_bytes, limiter, metrics
        # Request ids need to be unique, not secret: a random per-process prefix and a counter
        # (a uuid4 per request showed up in the read path's profile).
        self._rid_prefix, self._rid_next = uuid.uuid4().hex[:16], itertools.count(1).__next__

    def new_request_id(self) -> str:
        return f"{self._rid_prefix}{self._rid_next():016x}"  # 32 hex digits, as a uuid4

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        rid = rid if _RID.match(rid) else self.new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        status, refused = [0], False

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", [])
                      if k.lower() not in {h for h, _ in SECURITY_HEADERS}],
                    *SECURITY_HEADERS,
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        try:
            refusal = await self._refusal(scope, headers)
            if refusal is not None:
                refused = True
                code, message, extra = refusal
                await self._send_error(send_wrapped, code, message, rid, extra)
                return
            await self.app(scope, self._counting(receive), send_wrapped)
        except HTTPException as exc:  # the body counter fired outside FastAPI's handling
            if status[0]:
                raise
            await self._send_error(send_wrapped, exc.status_code, str(exc.detail), rid, {})
        except Exception as exc:  # a bug: answered here, so it too gets the headers and the id
            if status[0]:
                raise
            log_bug(exc, scope)
            await self._send_error(send_wrapped, 500, "internal error", rid, {})
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            if not template:  # refused here, no route matched, or a plain Starlette route
                template = "refused" if refused else ("unmatched" if status[0] == 404 else "other")
            seconds = time.perf_counter() - t0
            self.metrics.observe_request(scope["method"], template, status[0] or 500, seconds)
            access_log.info(json.dumps({
                "request_id": rid, "method": scope["method"], "route": template,
                "status": status[0] or 500, "ms": round(seconds * 1000, 2),
            }))

    async def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, dict] | None:
        if scope["method"] in BODY_METHODS:
            length = headers.get("content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    return 400, "Content-Length is not a number", {}
                if n > self.max_body:
                    return 413, f"request body over the {self.max_body}-byte limit", {}
            has_body = (length is not None and length != "0") or "transfer-encoding" in headers
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if has_body and media != "application/json":
                return 415, "request bodies must be application/json", {}
        if self.limiter is not None and scope["path"] not in UNLIMITED:
            client = scope.get("client")
            try:
                wait = await self.limiter.hit(key_id(headers), client[0] if client else "unknown")
            except Exception as err:  # noqa: BLE001 - Redis down: refuse (fail closed), say why
                access_log.warning(json.dumps({"event": "rate limiter unavailable",
                                               "error": type(err).__name__}))
                return 503, "the rate limiter is unavailable; retry later", {"retry-after": "5"}
            if wait is not None:
                return 429, "rate limit exceeded; retry later", {"retry-after": str(int(wait + 0.999))}
        return None

    def _counting(self, receive: Receive) -> Receive:
        seen = [0]
        limit = self.max_body

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise HTTPException(413, f"request body over the {limit}-byte limit")
            return message

        return wrapped

    @staticmethod
    async def _send_error(send: Send, status: int, message: str, rid: str, extra: dict) -> None:
        body = json.dumps(error_body(status, message, rid)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
