"""Events and per-user reads: /v1/events, /v1/users/{user_id}/..."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from api.service.auth import require
from api.service.errors import ApiError, ErrorBody
from api.service.offload import model_response, offload
from api.service.schemas import (
    EmbeddingOut,
    EventsIn,
    EventsOut,
    Recommendation,
    RecommendationsOut,
    SimilarOut,
    SimilarUser,
)
from store.records import MAX_ID_CHARS
from userenc.events import Event

router = APIRouter(prefix="/v1", tags=["users"])
UserId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)}


def ops(request: Request):  # noqa: ANN201
    return request.app.state.ops


@router.post("/events", response_model=EventsOut, responses=ERRORS,
             dependencies=[Depends(require("events:write"))],
             summary="Ingest a batch of events (all-or-nothing, idempotent per (user, event id))",
             description="Every event is validated before anything is written: one bad event "
             "refuses the whole request (400/422, naming its position, never its contents). "
             "The request is then written in one transaction: acknowledged whole or not at all. "
             "Retrying is harmless: events already stored count as `duplicates`. Events of "
             "erased users are refused and counted in `refused_erased`. Past the request "
             "timeout the answer is 504 and the write may still land: retry it.")
async def post_events(body: EventsIn, request: Request) -> Response:
    events = [Event(e.event_id, e.user_id, e.item_id, e.timestamp, e.fields) for e in body.events]
    c = await offload(request, ops(request).ingest, events)
    return model_response(EventsOut(received=c.received, inserted=c.inserted,
                                    duplicates=c.duplicates, refused_erased=c.tombstoned))


def _embedding(vec, version: str) -> EmbeddingOut:  # noqa: ANN001
    return EmbeddingOut(encoder_version=version, dim=int(vec.shape[0]),
                        embedding=[float(x) for x in vec])


@router.get("/users/{user_id}/embedding", response_model=EmbeddingOut, responses=ERRORS,
            dependencies=[Depends(require("embeddings:read"))],
            summary="The user's stored embedding (scope embeddings:read: it can leak history)")
async def get_embedding(user_id: UserId, request: Request) -> Response:
    o = ops(request)
    vec = await offload(request, o.embedding, user_id)
    if vec is None:
        raise ApiError(404, "no embedding stored for this user yet: POST .../embedding:refresh")
    return model_response(_embedding(vec, o.encoder_version))


@router.post("/users/{user_id}/embedding:refresh", response_model=EmbeddingOut,
             responses=ERRORS, dependencies=[Depends(require("embeddings:read"))],
             summary="Recompute the user's embedding from their history, store and index it")
async def refresh_embedding(user_id: UserId, request: Request) -> Response:
    o = ops(request)
    return model_response(_embedding(await offload(request, o.refresh_embedding, user_id),
                                     o.encoder_version))


def _k(request: Request, k: int) -> int:
    limit = request.app.state.settings.max_k
    if k > limit:
        raise ApiError(400, f"k is at most {limit}")
    return k


@router.get("/users/{user_id}/recommendations", response_model=RecommendationsOut,
            responses=ERRORS, dependencies=[Depends(require("generate"))],
            summary="The encoder's most likely next items, items already seen left out",
            description="A user with no events gets the most popular items of the encoder's "
            "training data instead: `source` says which (`encoder` or `popularity`).")
async def recommendations(user_id: UserId, request: Request,
                          k: Annotated[int, Query(ge=1)] = 10) -> Response:
    ranked = await offload(request, ops(request).recommendations, user_id, _k(request, k))
    return model_response(RecommendationsOut(
        items=[Recommendation(item_id=i, score=s) for i, s in ranked.items], source=ranked.source))


@router.get("/users/{user_id}/similar", response_model=SimilarOut, responses=ERRORS,
            dependencies=[Depends(require("embeddings:read"))],
            summary="The most similar live users by stored embedding (cosine)")
async def similar(user_id: UserId, request: Request,
                  k: Annotated[int, Query(ge=1)] = 10) -> Response:
    users = await offload(request, ops(request).similar, user_id, _k(request, k))
    return model_response(SimilarOut(users=[SimilarUser(user_id=u, score=s) for u, s in users]))
