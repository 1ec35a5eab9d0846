"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan opens the store,
loads the models and starts the async engine, and closes them all on shutdown."""

from __future__ import annotations

import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.service import errors
from api.service.auth import KeyChecker
from api.service.edge import Edge
from api.service.metrics import Metrics
from api.service.ratelimit import RateLimiter
from api.service.routes import admin, chat, ops, users
from api.service.settings import Settings
from api.userops import NotConfigured, UnknownUser, UserOps
from store.errors import StoreIntegrityError, StoreStateError

log = logging.getLogger("userllm.api")


def load_models(settings: Settings):  # noqa: ANN201
    """(personalizer or None, encoder for embeddings and recommendations or None)."""
    from api.personalize import Personalizer
    from training.adapter_checkpoint import adapter_meta
    from userenc.checkpoint import load_checkpoint

    engine_kwargs = dict(kv_cache_bytes=settings.kv_cache_mb << 20,
                         max_num_seqs=settings.max_num_seqs, quantize=settings.quantize)
    personalizer, encoder_dir = None, settings.encoder
    if settings.adapter is not None:
        personalizer = Personalizer.load(settings.adapter, settings.model, settings.encoder,
                                         **engine_kwargs)
        if encoder_dir is None:
            encoder_dir = Path((adapter_meta(settings.adapter).get("encoder") or {})["checkpoint"])
    elif settings.model is not None:
        personalizer = Personalizer.base_only(settings.model, **engine_kwargs)
    encoder = load_checkpoint(encoder_dir) if encoder_dir is not None else None
    return personalizer, encoder


# `userllm serve --workers N` names its settings file here for the worker processes.
CONFIG_FILE_ENV = "USERLLM_SERVE_CONFIG_FILE"


def app_from_environment() -> FastAPI:
    """The app of one worker process of `userllm serve --workers N` (uvicorn's factory): the
    settings from the environment, where the parent put its command-line values, over the
    settings file it named; the same JSON logs as the parent."""
    from api.serve_cli import setup_logging

    settings = Settings.load(os.environ.get(CONFIG_FILE_ENV) or None)
    setup_logging(settings.log_level)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    metrics = Metrics()
    limiter = (RateLimiter(settings.rate_limit, settings.rate_limit_per_address,
                           settings.redis_url, settings.rate_limit_namespace)
               if settings.rate_limit or settings.rate_limit_per_address else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        import torch

        from llm.engine.async_engine import AsyncEngine
        from store import Store

        torch.set_num_threads(settings.threads)
        store = Store.open(settings.home, settings.database_url, settings.keys_database_url)
        personalizer = None
        try:
            personalizer, encoder = load_models(settings)

            app.state.ops = UserOps(store, personalizer, encoder,
                                    settings.max_events_per_request, metrics.observe_cache)
            app.state.engine = AsyncEngine(personalizer.engine) if personalizer else None
            app.state.keys = KeyChecker(store.data, settings.key_cache_s)
            app.state.pool = ThreadPoolExecutor(settings.read_threads,
                                                thread_name_prefix="userllm-read")
            metrics.watch_engine(lambda: personalizer.engine.stats() if personalizer else None)
            # The models, tokenizers and catalogue are long-lived: moved out of the collector's
            # generations, a full collection no longer walks them. (On the tiny bench models
            # this changed no measured read latency; it is for large catalogues and models.)
            gc.collect()
            gc.freeze()
            log.info("userllm service ready (model %s, encoder %s)",
                     "loaded" if personalizer else "none", "loaded" if encoder else "none")
            yield
        finally:
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                await engine.close()
            if getattr(app.state, "pool", None) is not None:
                app.state.pool.shutdown(wait=True)
            if getattr(app.state, "ops", None) is not None:
                app.state.ops.close()
            if personalizer is not None:
                personalizer.close()
            store.close()

    app = FastAPI(title="userllm", version="1", lifespan=lifespan,
                  description="Personalized LLM responses from compact user embeddings. "
                  "Every error answers {\"error\": {\"type\", \"message\", \"request_id\"}}.")
    app.state.settings, app.state.metrics, app.state.limiter = settings, metrics, limiter
    app.state.engine = None
    errors.install(app)

    def handler(status: int, message: str | None = None):  # noqa: ANN202
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            rid = request.scope.get("state", {}).get("request_id")
            return errors.error_response(status, message or str(exc), rid)

        return handle

    app.add_exception_handler(UnknownUser, handler(404, "unknown user"))
    app.add_exception_handler(NotConfigured, handler(503))
    app.add_exception_handler(ValueError, handler(400))
    app.add_exception_handler(TimeoutError, handler(504, "request timed out"))
    app.add_exception_handler(StoreIntegrityError, handler(500, "stored data failed authentication"))
    app.add_exception_handler(StoreStateError, handler(503, "the store is unavailable"))
    for router in (users.router, chat.router, admin.router, ops.router):
        app.include_router(router)
    app.add_middleware(Edge, max_body_bytes=settings.max_body_bytes, limiter=limiter,
                       metrics=metrics)
    return app
