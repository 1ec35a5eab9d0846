"""POST /v1/chat/completions (the OpenAI shape; `stream: true` answers server-sent events the
`openai` client reads) and POST /v1/users/{user_id}/generate. The first output is awaited
before the response starts, so a bad request still gets its status code; a client that goes
away mid-stream closes the stream, which cancels its engine request."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.service.auth import require
from api.service.errors import ApiError, error_body
from api.service.routes.users import ERRORS
from api.service.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletion,
    ChatRequest,
    GenerateOut,
    GenerateRequest,
    Usage,
)
from api.userops import UserTokens, chat_messages, stream_with_deadline
from llm.engine.sampling_params import SamplingParams
from store.records import MAX_ID_CHARS

router = APIRouter(prefix="/v1", tags=["generation"])
CHAT_ERRORS = ERRORS | {504: ERRORS[400]}


def _sampling(request: Request, max_tokens: int | None, temperature: float, top_p: float = 1.0,
              seed: int | None = None, stop: list[str] | None = None) -> SamplingParams:
    cap = request.app.state.settings.max_tokens
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"max_tokens is at most {cap}")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                          max_tokens=max_tokens or min(cap, 64), stop=tuple(stop or ()))


async def _first(request: Request, prompt, sampling: SamplingParams, ut: UserTokens):  # noqa: ANN001, ANN202
    """The output stream, already holding its first output (errors surface here)."""
    state = request.app.state
    if state.engine is None:
        raise ApiError(503, "no model is configured")
    t0 = time.perf_counter()
    outputs = stream_with_deadline(state.engine, prompt, sampling, ut.tokens,
                                   state.settings.request_timeout_s)
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "the engine produced nothing") from None
    except BaseException:
        await outputs.aclose()
        raise
    state.metrics.ttft.observe(time.perf_counter() - t0)
    return first, outputs


async def _last(request: Request, first, outputs):  # noqa: ANN001, ANN202
    """Drain a non-streamed request's outputs to the finished one, counting its tokens."""
    last = first
    try:
        async for out in outputs:
            last = out
    finally:
        await outputs.aclose()
    request.app.state.metrics.tokens.inc(len(last.token_ids))
    return last


async def _tokens(request: Request, user: str | None, require_known: bool) -> UserTokens:
    return await asyncio.to_thread(request.app.state.ops.user_tokens, user, require_known)


def _headers(ut: UserTokens) -> dict[str, str]:
    return {"x-userllm-personalized": "true" if ut.personalized else "false"}


STREAMED = {200: {"description": "a chat.completion; with `stream: true`, server-sent "
                  "chat.completion.chunk events ending with `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/chat/completions", response_model=ChatCompletion, responses=CHAT_ERRORS | STREAMED,
             dependencies=[Depends(require("generate"))],
             summary="OpenAI-compatible chat; `user` selects the personalization")
async def chat_completions(body: ChatRequest, request: Request):  # noqa: ANN201
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    sampling = _sampling(request, body.max_completion_tokens or body.max_tokens,
                         body.temperature, body.top_p, body.seed, stop)
    ut = await _tokens(request, body.user, require_known=False)
    prompt = chat_messages([m.model_dump() for m in body.messages])
    first, outputs = await _first(request, prompt, sampling, ut)
    cid, created, metrics = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.metrics
    if not body.stream:
        last = await _last(request, first, outputs)
        reply = ChatCompletion(
            id=cid, created=created, model=body.model,
            choices=[ChatChoice(index=0, message=ChatChoiceMessage(content=last.text),
                                finish_reason=last.finish_reason)],
            usage=Usage(prompt_tokens=last.num_prompt_tokens,
                        completion_tokens=len(last.token_ids),
                        total_tokens=last.num_prompt_tokens + len(last.token_ids)))
        return JSONResponse(reply.model_dump(), headers=_headers(ut))

    def chunk(delta: dict, finish: str | None) -> bytes:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": body.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(doc)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""}, None)
        out = first
        try:
            while True:
                metrics.tokens.inc(len(out.new_token_ids))
                if out.new_text:
                    yield chunk({"content": out.new_text}, None)
                if out.finished:
                    yield chunk({}, out.finish_reason)
                    break
                out = await outputs.__anext__()
        except TimeoutError:
            rid = request.scope.get("state", {}).get("request_id")
            yield f"data: {json.dumps(error_body(504, 'generation timed out', rid))}\n\n".encode()
        except StopAsyncIteration:
            pass
        finally:
            await outputs.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(ut))


@router.post("/users/{user_id}/generate", response_model=GenerateOut, responses=CHAT_ERRORS,
             dependencies=[Depends(require("generate"))],
             summary="Answer a prompt for a stored user (404 when the store does not know them)")
async def generate(user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)],
                   body: GenerateRequest, request: Request) -> GenerateOut:
    sampling = _sampling(request, body.max_tokens, body.temperature, seed=body.seed)
    ut = await _tokens(request, user_id, require_known=True)
    first, outputs = await _first(request, chat_messages([{"role": "user", "content": body.prompt}]),
                                  sampling, ut)
    last = await _last(request, first, outputs)
    return GenerateOut(text=last.text, finish_reason=last.finish_reason,
                       personalized=ut.personalized, prompt_tokens=last.num_prompt_tokens,
                       completion_tokens=len(last.token_ids))
