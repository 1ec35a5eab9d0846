"""Encoder hyper-parameters: one slotted dataclass, saved as config.json beside the weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

FUSIONS = ("early", "late")
POSITIONS = ("rope", "learned")
ITEM_LOSSES = ("full", "sampled")
NEGATIVES = ("in_batch", "uniform")


@dataclass(slots=True)
class EncoderConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 2
    max_len: int = 200  # events seen; longer histories are left-truncated (>= 512 supported)
    dropout: float = 0.2
    # Early fusion: in training, each feature's embedding of an event is dropped whole with this
    # probability (the rest rescaled), so no single feature (item ids) can carry every token.
    feature_dropout: float = 0.0
    fusion: str = "early"  # early: concatenate feature embeddings then MLP; late: one encoder per feature
    positions: str = "rope"
    # HSTU-style relative time: a learned per-head attention bias for each log2 bucket of the
    # seconds between two events (early fusion only); 0: off.
    time_bias_buckets: int = 0
    # Next-item loss: full softmax over the catalogue, or sampled softmax for large catalogues.
    item_loss: str = "full"
    negatives: str = "in_batch"
    num_negatives: int = 256
    # A learned score added to every item already in the history (full-softmax loss only). A dot
    # product cannot score "like the history but not the history" by itself; a catalogue where
    # nothing repeats (a movie is rated once) learns it negative, one where items repeat
    # (music, groceries) positive.
    seen_bias: bool = False
    # Output: a projection to out_dim (the LLM's user-token width) and, if num_user_tokens > 0,
    # a Perceiver resampler compressing the states to that many user tokens.
    out_dim: int = 64
    num_user_tokens: int = 0
    perceiver_layers: int = 1
    # Stage 2 only (set on the adapter's copy of the encoder): the next-item head's top
    # item_hints candidates appended to the user tokens (userenc/item_hints.py); 0: none.
    item_hints: int = 0
    # Training objectives, a weighted mix (userenc/objectives.py). The defaults are today's
    # next-event training, so configs saved before these fields behave identically.
    next_event_weight: float = 1.0
    all_action_weight: float = 0.0  # PinnerFormer dense all-action over the next future_window events
    future_genre_weight: float = 0.0  # the genre distribution of the next future_window events
    future_window: int = 10
    future_genre_feature: str = "genres"  # a multi_categorical feature: the future-genre head's target
    # Filled from the tokenizer when the model is built: vocabulary size per feature.
    vocab_sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS or self.positions not in POSITIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, positions one of {POSITIONS}")
        if self.item_loss not in ITEM_LOSSES or self.negatives not in NEGATIVES:
            raise ValueError(f"item_loss must be one of {ITEM_LOSSES}, negatives one of {NEGATIVES}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model must split into n_heads heads of even width")
        if min(self.n_layers, self.max_len, self.out_dim) <= 0 or min(self.num_user_tokens,
                                                                      self.item_hints) < 0:
            raise ValueError("n_layers, max_len, out_dim must be positive; num_user_tokens and "
                             "item_hints >= 0")
        weights = (self.next_event_weight, self.all_action_weight, self.future_genre_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("objective weights must be >= 0 and not all 0")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError("feature_dropout must be in [0, 1)")
        if self.time_bias_buckets < 0 or (self.time_bias_buckets and self.fusion != "early"):
            raise ValueError("time_bias_buckets must be >= 0, and needs early fusion")
        if self.seen_bias and self.item_loss != "full":
            raise ValueError("seen_bias needs the full-softmax item loss")
        if self.future_window < 1:
            raise ValueError("future_window must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder settings: {', '.join(sorted(unknown))}")
        return cls(**d)
