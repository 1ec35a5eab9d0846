"""Per-request sampling settings. Validated here, at the edge, so a bad request fails at
add_request with a clear ValueError and never reaches a running batch."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    # 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    # HF semantics: a logit of a token already in prompt+output is divided by the penalty when
    # positive, multiplied when negative. 1.0: off.
    repetition_penalty: float = 1.0
    # A per-request torch.Generator makes the draw independent of batch composition.
    seed: int | None = None
    max_tokens: int = 64
    # eos and stop_token_ids cannot be sampled before this many output tokens (masked out, as
    # transformers' min_new_tokens does). ignore_eos only keeps going after an eos.
    min_tokens: int = 0
    # Finish when the detokenized output contains one of these; the stop string is not returned.
    stop: tuple[str, ...] | list[str] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] | list[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # False: token ids only, no text (no detokenizing cost; stop strings need text).
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
