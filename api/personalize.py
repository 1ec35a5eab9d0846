"""The one personalization path: a user's history in the store -> the adapter's encoder ->
K user tokens -> the engine serving the trained adapter.

    p = Personalizer.load(adapter_dir)                   # base model named by the adapter
    tokens = p.user_tokens(history)                      # [K, D], or None for no history
    for out in p.stream(p.messages("What do I like?"), tokens): print(out.new_text, end="")

The CLI (`userllm generate`), the demo and the HTTP routes all call this; nothing else reaches
into the encoder. A user with no events gets no user tokens: the engine answers as the base
model (the stated cold-start fallback).

User tokens are cached sealed in the store (`cached_user_tokens`): one artefact per user and
adapter encoder, holding the store's digest of the history it was computed from (a hash of the
user's keyed event row ids: checking it opens no payload). New events change the digest (the
tokens are recomputed: the encoder is not incremental), another adapter or encoder checkpoint
changes the artefact's name, and erasure deletes the user's artefacts.

`recommend` ranks the catalogue with an encoder's next-item head, items already seen left out
(`ranked_for` says which source ranked: a history with no events gets the stated cold-start
fallback, the training-count popularity of userenc/cold_start.py);
`cached_recommend` keeps the history's latest state and seen items sealed beside the user tokens,
keyed by the store's history digest (the keyed ids of the stored events: no payload is opened to
check it), so a repeated read neither decrypts the history nor runs the encoder.
"""
from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from api.recent_answers import RecentAnswers
from llm.engine.engine import Engine
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput
from training.adapter_checkpoint import ENCODER_WEIGHTS, adapter_meta, load_adapter_encoder
from training.prompts import SYSTEM
from userenc.checkpoint import LoadedEncoder
from userenc.cold_start import SOURCE_ENCODER, Ranked, popular_items
from userenc.events import Event
from userenc.spec import FIRST_ID


@dataclass(slots=True)
class Personalizer:
    engine: Engine
    encoder: LoadedEncoder | None
    adapter: Path | None
    # Names the user tokens' source (the adapter's trained encoder tensors and its checkpoint):
    # the token cache keys on it.
    token_version: str = field(default="")

    @classmethod
    def load(cls, adapter: str | Path, model: str | Path | None = None,
             encoder: str | Path | None = None, **engine_kwargs) -> "Personalizer":
        """The adapter's base model (or `model`, which must be the same checkpoint: its sha256
        is checked) with the adapter loaded, and the adapter's encoder."""
        meta = adapter_meta(adapter)
        if meta.get("arm") != "userllm":
            raise ValueError(f"adapter {str(adapter)!r} is a {meta.get('arm')!r} baseline, not a "
                             "USER-LLM adapter: it reads no user tokens")
        base = model or (meta.get("base_model") or {}).get("path")
        if not base or not Path(base).exists():
            raise FileNotFoundError(f"the adapter's base model {base!r} is missing (give --model)")
        engine = Engine.from_pretrained(base, adapter=adapter, **engine_kwargs)
        loaded = load_adapter_encoder(adapter, encoder_dir=encoder)
        digest = hashlib.sha256((Path(adapter) / ENCODER_WEIGHTS).read_bytes())
        digest.update(str(meta["encoder"]["weights_sha256"]).encode())
        return cls(engine, loaded, Path(adapter), digest.hexdigest()[:24])

    @classmethod
    def base_only(cls, model: str | Path, **engine_kwargs) -> "Personalizer":
        """The base model without an adapter: every answer is unpersonalized."""
        return cls(Engine.from_pretrained(model, **engine_kwargs), None, None, "")

    def user_tokens(self, history: list[Event]) -> torch.Tensor | None:
        if not history or self.encoder is None:
            return None
        return self.encoder.user_tokens([history])[0]

    def cached_user_tokens(self, store, external_id: str) -> tuple[torch.Tensor | None, bool]:  # noqa: ANN001
        """(tokens, cache hit): the sealed copy in the store when it was computed from the user's
        current history (the store's digest of it: no payload opened) by this adapter's encoder,
        else read, encoded and sealed now. (None, False) for a user without events."""
        if self.encoder is None:
            return None, False
        digest = store.history_digest(external_id)
        if digest is None:
            return None, False

        def compute() -> list[np.ndarray]:
            history = store.history(external_id)
            if not history:  # erased between the digest and the read
                raise LookupError("the user has no events")
            return [self.user_tokens(history).detach().float().cpu().numpy()]

        (tokens,), hit = sealed_per_history(
            store, external_id, f"user-tokens-{self.token_version}", digest, compute)
        return torch.from_numpy(tokens), hit

    @staticmethod
    def messages(prompt: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]

    def stream(self, prompt, user_tokens: torch.Tensor | None,
               sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:
        return self.engine.stream(prompt, sampling or SamplingParams(temperature=0.0),
                                  user_tokens=user_tokens)

    def close(self) -> None:
        self.engine.close()


_CACHE_MAGIC = b"UC1"  # the layout below; any other blob (an older layout) is a miss
_DTYPES = {b"f": np.dtype("<f4"), b"i": np.dtype("<i4")}


def _pack(fingerprint: bytes, arrays: list[np.ndarray]) -> bytes:
    parts = [_CACHE_MAGIC, fingerprint, struct.pack("<I", len(arrays))]
    for a in arrays:
        code = b"f" if a.dtype.kind == "f" else b"i"
        a = np.ascontiguousarray(a, dtype=_DTYPES[code]).reshape(a.shape[0] if a.ndim else 1, -1)
        parts += [code, struct.pack("<II", *a.shape), a.tobytes()]
    return b"".join(parts)


def _unpack(blob: bytes, fingerprint: bytes) -> list[np.ndarray] | None:
    """The arrays when `blob` is in this layout and was computed for `fingerprint`, else None."""
    if blob[:3] != _CACHE_MAGIC or blob[3:35] != fingerprint:
        return None
    (n,), at, out = struct.unpack_from("<I", blob, 35), 39, []
    for _ in range(n):
        dtype = _DTYPES.get(blob[at:at + 1])
        if dtype is None:
            return None
        rows, cols = struct.unpack_from("<II", blob, at + 1)
        size, at = rows * cols * dtype.itemsize, at + 9
        if len(blob) < at + size:
            return None
        out.append(np.frombuffer(blob, dtype, rows * cols, at).reshape(rows, cols).copy())
        at += size
    return out if at == len(blob) else None


def sealed_per_history(store, external_id: str, name: str, fingerprint: bytes,
                       compute: Callable[[], list[np.ndarray]]) -> tuple[list[np.ndarray], bool]:  # noqa: ANN001
    """(arrays, cache hit): the arrays (float32 or int32, 2-d) sealed in the store's artefact
    `name` when they were computed for this very history (`fingerprint` leads the blob), else
    `compute()`d now and sealed for next time. Erasure deletes a user's artefacts."""
    assert len(fingerprint) == 32, "fingerprints are 32 bytes"
    blob = store.artefact(external_id, name)
    arrays = _unpack(blob, fingerprint) if blob is not None else None
    if arrays is not None:
        return arrays, True
    arrays = compute()
    store.put_artefact(external_id, name, _pack(fingerprint, arrays))
    return arrays, False


def recommend(encoder: LoadedEncoder, history: list[Event], k: int, now: int | None = None
              ) -> list[tuple[str, float]]:
    """The encoder's top-k next items for this history, items it already holds left out:
    [(item id, score)], best first. Empty for an empty history. `now`: the request time (unix
    seconds; default the clock), read by an encoder with a request-gap feature."""
    if not history or k < 1:
        return []
    return _top_unseen(encoder, _state_now(encoder, _rank_inputs(encoder, history), now), k)


def ranked_for(encoder: LoadedEncoder, history: list[Event], k: int, now: int | None = None) -> Ranked:
    """recommend(), or for a history without events the popularity fallback; `.source` says
    which ranked the items."""
    if not history:
        return popular_items(encoder.tokenizer, k)
    return Ranked(recommend(encoder, history, k, now), SOURCE_ENCODER)


def _rank_inputs(encoder: LoadedEncoder, history: list[Event]) -> list[np.ndarray]:
    """[the history's latest state [1, d_model], its items' vocabulary ids [1, n]]; for an
    encoder that reads the time until the request, the state for every bucket of it
    [buckets, d_model] and the last event's time [1, 1] (to pick the bucket at request time: the
    cache then holds at any later time, and the time is sealed with it)."""
    vocab = encoder.tokenizer.vocabs[encoder.tokenizer.spec.item.name]
    seen = np.array(sorted({vocab.id(e.item_id) for e in history}), dtype=np.int32)
    if encoder.request_gap is None:
        return [encoder.last_states([history]).numpy(), seen[None]]
    # The cache holds int32: the time as (high, low) halves, so any int64 time round-trips.
    high, low = divmod(history[-1].timestamp, 2**31)
    return [encoder.last_states_per_request_gap(history).numpy(), seen[None], np.array([[high, low]], dtype=np.int64)]


def _state_now(encoder: LoadedEncoder, inputs: list[np.ndarray], now: int | None
               ) -> tuple[torch.Tensor, np.ndarray]:
    """(the state to rank from at request time `now`, the seen item ids)."""
    states, seen = inputs[0], inputs[1][0]
    row = 0
    if encoder.request_gap is not None:
        assert len(inputs) == 3 and states.shape[0] == encoder.request_gap.fixed_size - FIRST_ID, "one state per bucket"
        last = int(inputs[2][0, 0]) * 2**31 + int(inputs[2][0, 1])
        row = encoder.request_gap_row(last, int(time.time()) if now is None else now)
    return torch.from_numpy(states[row]), seen


def _top_unseen(encoder: LoadedEncoder, state_seen: tuple[torch.Tensor, np.ndarray], k: int
                ) -> list[tuple[str, float]]:
    state, seen = state_seen
    scores = encoder.item_scores(state[None])[0].clone()
    scores[torch.from_numpy(seen.astype(np.int64))] = float("-inf")
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    vocab = encoder.tokenizer.vocabs[encoder.tokenizer.spec.item.name]
    return [(vocab.value(i), v) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def cached_recommend(store, encoder: LoadedEncoder, version: str, external_id: str, k: int,
                     history: Callable[[], list[Event]], answers: RecentAnswers | None = None,
                     now: int | None = None) -> tuple[list[tuple[str, float]] | None, bool]:  # noqa: ANN001
    """recommend() with the history's latest state and seen items sealed in the store per
    encoder `version`, keyed by the store's history digest (no payload is opened to check it):
    a repeated read ranks the catalogue with one small matrix product, and only a changed
    history is read (`history()`) and encoded again. (items, cache hit); (None, False) for a
    user without events. `answers`: this process's recent answers, consulted after the digest
    (so a changed or erased history never meets an old answer); not for an encoder that reads
    the request time `now`, whose answers change with it (its sealed states do not)."""
    assert k >= 1, "k is at least 1"
    if encoder.request_gap is not None:
        answers = None
    digest = store.history_digest(external_id)
    if digest is None:
        return None, False
    if answers is not None and (items := answers.get(external_id, digest, k)) is not None:
        return items, True
    inputs, hit = sealed_per_history(store, external_id, f"rank-state-{version}", digest,
                                     lambda: _rank_inputs(encoder, history()))
    items = _top_unseen(encoder, _state_now(encoder, inputs, now), k)
    if answers is not None:
        answers.put(external_id, digest, k, items)
    return items, hit
