"""What the HTTP routes do, as plain functions over the store, the encoder and the engine (the
routes only parse and shape). Every user-facing operation resolves the user through the store;
an unknown or erased user is `UnknownUser` (404 at the edge).

Ingest is all-or-nothing per request: every event is validated first (a bad one refuses the
whole request, naming its position), then the request is written in one transaction, so a
request is either acknowledged whole or not at all, and a retry is harmless (idempotent per
(user, event id): already stored events count as duplicates). Events of erased users are
refused and counted, never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from api.personalize import Personalizer, cached_recommend
from api.recent_answers import RecentAnswers
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput
from store import IngestCounts, Store, delete_user
from store import audit as store_audit
from store.admin import new_api_key, revoke_api_key, rotate_kek
from store.apikeys import list_keys
from store.erasure import erasure_status, request_erasure
from training.embedding import embed_users, store_embeddings
from training.prompts import SYSTEM
from userenc.checkpoint import LoadedEncoder
from userenc.cold_start import SOURCE_ENCODER, Ranked, popular_items
from userenc.events import Event

log = logging.getLogger("userllm.api")


class UnknownUser(LookupError):
    """The store holds no live user by this id (never stored, or erased)."""

    def __init__(self) -> None:
        super().__init__("unknown user")


class NotConfigured(RuntimeError):
    """The service runs without the model this operation needs."""


@dataclass(slots=True)
class UserTokens:
    tokens: torch.Tensor | None
    cache_hit: bool

    @property
    def personalized(self) -> bool:
        return self.tokens is not None


class UserOps:
    def __init__(self, store: Store, personalizer: Personalizer | None = None,
                 encoder: LoadedEncoder | None = None, max_events: int = 1000,
                 on_cache: Callable[[str, bool, float], None] | None = None):
        self.store, self.personalizer, self.encoder = store, personalizer, encoder
        self.encoder_version = encoder.version if encoder is not None else None
        self.max_events = max_events
        # (cache, hit, seconds) per sealed-cache lookup: "user_tokens" or "rank_state"
        self.on_cache = on_cache
        self.rank_version = (hashlib.sha256(self.encoder_version.encode()).hexdigest()[:24]
                             if encoder is not None else "")
        self.answers = RecentAnswers()  # this process's recommendation answers
        self._erasures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="userllm-erasure")
        self.pending: dict[int, Future] = {}

    def close(self) -> None:
        self._erasures.shutdown(wait=True)

    # -- events ---------------------------------------------------------------------------
    def ingest(self, events: list[Event]) -> IngestCounts:
        if len(events) > self.max_events:
            raise ValueError(f"at most {self.max_events} events per request")
        return self.store.ingest(events, batch_size=max(1, len(events)))

    # -- reads ----------------------------------------------------------------------------
    def _need_encoder(self) -> LoadedEncoder:
        if self.encoder is None:
            raise NotConfigured("no encoder is configured (set USERLLM_ENCODER or USERLLM_ADAPTER)")
        return self.encoder

    def history(self, external_id: str) -> list[Event]:
        history = self.store.history(external_id)  # [] for an unknown or erased user
        if not history:
            raise UnknownUser()
        return history

    def embedding(self, external_id: str) -> np.ndarray | None:
        """The stored embedding under the configured encoder (None: not computed yet)."""
        self._need_encoder()
        vec = self.store.embedding(external_id, self.encoder_version)
        if vec is None and self.store.user_key(external_id) is None:
            raise UnknownUser()
        return vec

    def refresh_embedding(self, external_id: str) -> np.ndarray:
        encoder = self._need_encoder()
        users, vectors = embed_users(encoder, {external_id: self.history(external_id)})
        store_embeddings(self.store, encoder, users, vectors)
        return vectors[0]

    def recommendations(self, external_id: str, k: int) -> Ranked:
        """The encoder's top k for the user's history; a user without events (cold start: not
        stored yet) gets the popularity fallback, `.source` saying so. An erased user stays
        unknown (404), as everywhere else."""
        encoder = self._need_encoder()
        t0 = time.perf_counter()
        items, hit = cached_recommend(self.store, encoder, self.rank_version, external_id, k,
                                      lambda: self.history(external_id), self.answers)
        if items is None:  # no events: never stored, or erased
            if self.store.keys.tombstone(self.store.hasher.user(external_id)) is not None:
                raise UnknownUser()
            return popular_items(encoder.tokenizer, k)
        if self.on_cache is not None:
            self.on_cache("rank_state", hit, time.perf_counter() - t0)
        return Ranked(items, SOURCE_ENCODER)

    def similar(self, external_id: str, k: int) -> list[tuple[str, float]]:
        self._need_encoder()
        if self.store.user_key(external_id) is None:
            raise UnknownUser()
        return self.store.similar_users(external_id, k, self.encoder_version)

    def user_tokens(self, external_id: str | None, require_known: bool = False) -> UserTokens:
        """The user's K tokens (from the sealed cache when their history is unchanged). An
        unknown user gets none (cold start: the base model answers) unless `require_known`."""
        if self.personalizer is None:
            raise NotConfigured("no model is configured (set USERLLM_ADAPTER or USERLLM_MODEL)")
        if external_id is None:
            return UserTokens(None, False)
        t0 = time.perf_counter()
        try:
            tokens, hit = self.personalizer.cached_user_tokens(self.store, external_id)
        except LookupError:  # erased while we looked
            tokens, hit = None, False
        if tokens is None and require_known and self.store.history_digest(external_id) is None:
            raise UnknownUser()
        if self.on_cache is not None and tokens is not None:
            self.on_cache("user_tokens", hit, time.perf_counter() - t0)
        return UserTokens(tokens, hit)

    # -- admin ----------------------------------------------------------------------------
    def request_erasure(self, external_id: str) -> tuple[int, bool]:
        """Open the user's erasure request and run it in the background: (request id, already
        erased). Erasures run one at a time, in order."""
        try:
            request_id, already = request_erasure(self.store, external_id)
        except ValueError:
            raise UnknownUser() from None
        if not already:
            self.pending[request_id] = self._erasures.submit(self._erase, external_id)
        return request_id, already

    def _erase(self, external_id: str) -> None:
        self.answers.forget(external_id)
        try:
            delete_user(self.store, external_id)
        except Exception as err:  # noqa: BLE001 - reported by status (stays "running"), logged
            log.error("erasure failed (%s); it resumes on the next request", type(err).__name__)
            return
        if self.personalizer is not None:
            # Cached KV blocks were computed from the user's tokens (and their prompts): drop
            # the idle ones (a block held by a running request goes when that request ends).
            self.personalizer.engine.reset_prefix_cache()

    def erasure_status(self, request_id: int) -> dict | None:
        return erasure_status(self.store, request_id)

    def create_api_key(self, scopes: list[str], label: str) -> tuple[int, str]:
        return new_api_key(self.store, scopes, label)

    def api_keys(self) -> list[dict]:
        return list_keys(self.store.data)

    def revoke_api_key(self, key_id: int) -> bool:
        return revoke_api_key(self.store, key_id)

    def rotate_keys(self) -> dict:
        return asdict(rotate_kek(self.store))

    def audit(self, after: int, limit: int) -> dict:
        report = self.store.audit_report()
        return {
            "entries": store_audit.entries(self.store.data, after, limit),
            "verified": not report.problems,
            "problems": report.problems,
            "total": report.entries,
        }


def chat_messages(messages: list[dict]) -> list[dict]:
    """The client's messages, behind the system prompt the adapter was trained with unless the
    client gives its own."""
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": SYSTEM}, *messages]


async def stream_with_deadline(engine, prompt, sampling: SamplingParams,
                               tokens: torch.Tensor | None, timeout_s: float
                               ) -> AsyncIterator[RequestOutput]:  # noqa: ANN001
    """The engine's outputs for one request; past `timeout_s` in all it raises TimeoutError,
    and closing the stream early (a client that went away) cancels the request, freeing its
    KV blocks."""
    deadline = time.monotonic() + timeout_s
    outputs = engine.stream(prompt, sampling, tokens)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("generation timed out")
            try:
                out = await asyncio.wait_for(outputs.__anext__(), left)
            except StopAsyncIteration:
                return
            yield out
            if out.finished:
                return
    finally:
        await outputs.aclose()
