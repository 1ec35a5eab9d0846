"""Admin routes (scope `admin`): erasure requests and their status, API keys (create, list,
revoke), KEK rotation, the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from api.service.auth import require
from api.service.errors import ApiError
from api.service.routes.users import ERRORS, ops
from api.service.schemas import (
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    ApiKeysOut,
    AuditOut,
    ErasureAccepted,
    ErasureStatus,
    RotationOut,
)
from store.records import MAX_ID_CHARS

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require("admin"))])


@router.delete("/users/{user_id}", status_code=202, response_model=ErasureAccepted,
               responses=ERRORS, summary="Request the erasure of a user everywhere (runs in the background)")
def erase_user(user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)],
               request: Request) -> JSONResponse:
    request_id, already = ops(request).request_erasure(user_id)
    body = ErasureAccepted(request_id=request_id, status="done" if already else "accepted")
    return JSONResponse(body.model_dump(), status_code=202,
                        headers={"location": f"/v1/admin/erasures/{request_id}"})


@router.get("/erasures/{request_id}", response_model=ErasureStatus, responses=ERRORS,
            summary="An erasure request's state")
def erasure(request_id: Annotated[int, Path(ge=1, lt=2**62)], request: Request) -> ErasureStatus:
    status = ops(request).erasure_status(request_id)
    if status is None:
        raise ApiError(404, "no such erasure request")
    return ErasureStatus(**status)


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated, responses=ERRORS,
             summary="Create an API key: the key is in this answer once, only its hash is kept")
def create_api_key(body: ApiKeyIn, request: Request) -> ApiKeyCreated:
    key_id, token = ops(request).create_api_key(list(body.scopes), body.label)
    return ApiKeyCreated(id=key_id, key=token, scopes=sorted(set(body.scopes)))


@router.get("/api-keys", response_model=ApiKeysOut, responses=ERRORS,
            summary="API keys: ids, labels, scopes and times (never the keys or their hashes)")
def api_keys(request: Request) -> ApiKeysOut:
    return ApiKeysOut(keys=[ApiKeyOut(**k) for k in ops(request).api_keys()])


@router.delete("/api-keys/{key_id}", status_code=204, responses=ERRORS,
               summary="Revoke an API key (at once on this server; within the key cache time on others)")
def revoke_api_key(key_id: Annotated[int, Path(ge=1, lt=2**62)], request: Request) -> Response:
    if not ops(request).revoke_api_key(key_id):
        raise ApiError(404, "no live API key has this id")
    request.app.state.keys.forget()
    return Response(status_code=204)


@router.post("/keys/rotate", response_model=RotationOut, responses=ERRORS,
             summary="Rotate the key-encryption key: rewrap every data key under a new KEK version")
def rotate(request: Request) -> RotationOut:
    return RotationOut(**ops(request).rotate_keys())


@router.get("/audit", response_model=AuditOut, responses=ERRORS,
            summary="Audit-log entries after `after` (counts and keyed ids only), and whether the chain verifies")
def audit(request: Request, after: Annotated[int, Query(ge=0, lt=2**62)] = 0,
          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditOut:
    return AuditOut(**ops(request).audit(after, limit))
