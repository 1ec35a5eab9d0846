"""The one personalization path: a user's history in the store -> the adapter's encoder ->
K user tokens -> the engine serving the trained adapter.

    p = Personalizer.load(adapter_dir)                   # base model named by the adapter
    tokens = p.user_tokens(history)                      # [K, D], or None for no history
    for out in p.stream(p.messages("What do I like?"), tokens): print(out.new_text, end="")

The CLI (`userllm generate`), the demo and the HTTP routes all call this; nothing else reaches
into the encoder. A user with no events gets no user tokens: the engine answers as the base
model (the stated cold-start fallback), and `PersonalizedAnswer.personalized` says so.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.engine.engine import Engine
from llm.engine.sampling_params import SamplingParams
from llm.engine.sequence import RequestOutput
from training.adapter_checkpoint import adapter_meta, load_adapter_encoder
from training.prompts import SYSTEM
from userenc.checkpoint import LoadedEncoder
from userenc.events import Event


@dataclass(slots=True)
class Personalizer:
    engine: Engine
    encoder: LoadedEncoder | None
    adapter: Path

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
        return cls(engine, load_adapter_encoder(adapter, encoder_dir=encoder), Path(adapter))

    def user_tokens(self, history: list[Event]) -> torch.Tensor | None:
        if not history:
            return None
        assert self.encoder is not None
        return self.encoder.user_tokens([history])[0]

    @staticmethod
    def messages(prompt: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]

    def stream(self, prompt, user_tokens: torch.Tensor | None,
               sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:
        return self.engine.stream(prompt, sampling or SamplingParams(temperature=0.0),
                                  user_tokens=user_tokens)

    def close(self) -> None:
        self.engine.close()
