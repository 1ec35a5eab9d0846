"""asyncio wrapper around Engine for the API server.

One background task owns the stepping: while requests are unfinished it runs `engine.step()` in
a worker thread (the event loop stays free) and routes each RequestOutput to its request's
queue; when idle it sleeps on an event. `stream()` is an async generator of RequestOutput;
cancelling the awaiting task (a client that went away) or closing the generator cancels the
request and frees its blocks. Validation errors surface from `stream()` / `add_request()`
before anything is queued.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import torch

from llm.engine.engine import Engine
from llm.engine.inputs import Prompt
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "AsyncEngine":
        return cls(Engine.from_pretrained(path, **kwargs))

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                outputs = await asyncio.to_thread(self.engine.step)
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a failing step must not leave streams hanging forever
            self._error = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)
            raise

    async def add_request(self, prompt: Prompt, user_tokens: torch.Tensor | None = None,
                          sampling: SamplingParams | None = None, *,
                          request_id: str | None = None) -> str:
        self._ensure_loop()
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        # The queue exists before the request does: the loop may step it at once.
        self._queues[rid] = asyncio.Queue()
        try:
            # Tokenizing takes the engine lock, which a running step holds: wait off the loop.
            await asyncio.to_thread(self.engine.add_request, prompt, user_tokens, sampling,
                                    request_id=rid)
        except BaseException:
            self._queues.pop(rid, None)
            raise
        assert self._wakeup is not None
        self._wakeup.set()
        return rid

    async def stream(self, prompt: Prompt, sampling: SamplingParams | None = None,
                     user_tokens: torch.Tensor | None = None, *,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = await self.add_request(prompt, user_tokens, sampling, request_id=request_id)
        async for out in self.outputs(rid):
            yield out

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        queue = self._queues[request_id]
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.cancel(request_id)

    async def generate(self, prompt: Prompt, sampling: SamplingParams | None = None,
                       user_tokens: torch.Tensor | None = None) -> RequestOutput:
        last = None
        async for out in self.stream(prompt, sampling, user_tokens):
            last = out
        assert last is not None and last.finished
        return last

    async def cancel(self, request_id: str) -> bool:
        self._queues.pop(request_id, None)
        # Shielded: cancel runs from a cancelled task's cleanup and must still complete.
        return await asyncio.shield(asyncio.to_thread(self.engine.cancel, request_id))

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
