"""The one personalization path: a user's history in the store -> the adapter's encoder ->
K user tokens -> the engine serving the trained adapter.

    p = Personalizer.load(adapter_dir)                   # base model named by the adapter
    tokens = p.user_tokens(history)                      # [K, D], or None for no history
    for out in p.stream(p.messages("What do I like?"), tokens): print(out.new_text, end="")

The CLI (`userllm generate`), the demo and the HTTP routes all call this; nothing else reaches
into the encoder. A user with no events gets no user tokens: the engine answers as the base
model (the stated cold-start fallback).

User tokens are cached sealed in the store (`cached_user_tokens`): one artefact per user and
adapter encoder, holding a fingerprint of the history it was computed from. New events change
the fingerprint (the tokens are recomputed: the encoder is not incremental), another adapter or
encoder checkpoint changes the artefact's name, and erasure deletes the user's artefacts.

`recommend` ranks the catalogue with an encoder's next-item head, items already seen left out;
`cached_recommend` keeps the history's latest state sealed beside the user tokens (same
fingerprint rule), so repeated reads skip the encoder.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llm.engine.engine import Engine
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput
from training.adapter_checkpoint import ENCODER_WEIGHTS, adapter_meta, load_adapter_encoder
from training.prompts import SYSTEM
from userenc.checkpoint import LoadedEncoder
from userenc.events import Event


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

    def cached_user_tokens(self, store, external_id: str, history: list[Event]
                           ) -> tuple[torch.Tensor | None, bool]:  # noqa: ANN001
        """(tokens, cache hit): the sealed copy in the store when it was computed from this very
        history by this adapter's encoder, else computed now and sealed for next time."""
        if not history or self.encoder is None:
            return None, False
        return sealed_per_history(store, external_id, f"user-tokens-{self.token_version}", history,
                                  lambda: self.user_tokens(history))

    @staticmethod
    def messages(prompt: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]

    def stream(self, prompt, user_tokens: torch.Tensor | None,
               sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:
        return self.engine.stream(prompt, sampling or SamplingParams(temperature=0.0),
                                  user_tokens=user_tokens)

    def close(self) -> None:
        self.engine.close()


def history_fingerprint(history: list[Event]) -> bytes:
    """32 bytes that change whenever the history does (ids, items, times; fields by event id:
    the store never rewrites a stored event)."""
    h = hashlib.sha256()
    for e in history:
        h.update(f"{len(e.event_id)}:{e.event_id}|{len(e.item_id)}:{e.item_id}|{e.timestamp};".encode())
    return h.digest()


def sealed_per_history(store, external_id: str, name: str, history: list[Event],
                       compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:  # noqa: ANN001
    """(tensor, cache hit): the float32 2-d tensor sealed in the store's artefact `name` when it
    was computed from this very history (its fingerprint leads the blob), else `compute()`d now
    and sealed for next time. Erasure deletes a user's artefacts with their data key."""
    fp = history_fingerprint(history)
    blob = store.artefact(external_id, name)
    if blob is not None and blob[:32] == fp:
        rows, cols = struct.unpack("<II", blob[32:40])
        arr = np.frombuffer(blob[40:], dtype="<f4")
        if arr.size == rows * cols:
            return torch.from_numpy(arr.reshape(rows, cols).copy()), True
    value = compute()
    assert value.dim() == 2, "sealed per-history values are 2-d"
    rows, cols = value.shape
    body = value.detach().float().cpu().numpy().astype("<f4").tobytes()
    store.put_artefact(external_id, name, fp + struct.pack("<II", rows, cols) + body)
    return value, False


def recommend(encoder: LoadedEncoder, history: list[Event], k: int,
              state: torch.Tensor | None = None) -> list[tuple[str, float]]:
    """The encoder's top-k next items for this history, items it already holds left out:
    [(item id, score)], best first. Empty for an empty history. `state`: the history's latest
    state [d_model] when the caller has it (cached_recommend), else computed here."""
    if not history or k < 1:
        return []
    if state is None:
        state = encoder.last_states([history])[0]
    scores = encoder.item_scores(state[None])[0].clone()
    vocab = encoder.tokenizer.vocabs[encoder.tokenizer.spec.item.name]
    seen = sorted({vocab.id(e.item_id) for e in history})
    scores[seen] = float("-inf")
    n = int(torch.isfinite(scores).sum())
    top = torch.topk(scores, min(k, n))
    return [(vocab.value(int(i)), float(v)) for v, i in zip(top.values, top.indices)]


def cached_recommend(store, encoder: LoadedEncoder, version: str, external_id: str,
                     history: list[Event], k: int) -> tuple[list[tuple[str, float]], bool]:  # noqa: ANN001
    """recommend() with the history's latest state sealed in the store per encoder `version`
    (recomputed when the history changes): a repeated read ranks the catalogue with one small
    matrix product instead of running the encoder. (items, cache hit)."""
    if not history or k < 1:
        return [], False
    state, hit = sealed_per_history(store, external_id, f"rank-state-{version}", history,
                                    lambda: encoder.last_states([history]))
    return recommend(encoder, history, k, state[0]), hit
