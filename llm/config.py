"""ModelConfig: everything our Llama-family modules need, read once from a Hugging Face config.

Transformers' configs differ across versions and families (v5 folds rope_theta and the scaling
into `rope_parameters`, older ones keep `rope_theta` + `rope_scaling`; Qwen2 has q/k/v biases
without saying so in `attention_bias`). `ModelConfig.from_hf` is the one place that knows this,
so the layers only read plain fields.

Cross-attention settings are ours, not the checkpoint's: the engine (or training) chooses them
when it loads a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
INTEGRATIONS = ("cross", "soft_prompt")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None or a dict with "rope_type" in ROPE_TYPES and that type's keys (factor, ...).
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases
    o_bias: bool = False  # Llama's attention_bias also puts one on o_proj
    mlp_bias: bool = False
    model_type: str = "llama"
    # --- ours: personalisation ---
    integration: str = "cross"  # "cross" (gated cross-attention blocks) or "soft_prompt"
    # A gated cross-attention block runs before decoder layer i when (i + 1) % cross_every_n == 0
    # (so N=4 on 30 layers: before layers 3, 7, ..., 27); 0 = no blocks.
    cross_every_n: int = 0
    user_dim: int | None = None  # width D of incoming user tokens [K, D]
    cross_heads: int | None = None  # query = key/value heads in a cross block; default num_heads
    cross_intermediate_size: int | None = None  # gated MLP width; default intermediate_size

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "heads must be a multiple of kv heads"
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {self.integration!r}")
        if self.cross_every_n < 0:
            raise ValueError(f"cross_every_n must be >= 0, got {self.cross_every_n}")
        if self.uses_user_tokens and (self.user_dim is None or self.user_dim <= 0):
            raise ValueError(f"integration {self.integration!r} with user tokens needs a "
                             f"positive user_dim, got {self.user_dim}")
        if self.cross_heads is None:
            self.cross_heads = self.num_heads
        if self.cross_intermediate_size is None:
            self.cross_intermediate_size = self.intermediate_size
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope scaling {kind!r} is not supported "
                                 f"(supported: {ROPE_TYPES})")

    @property
    def uses_user_tokens(self) -> bool:
        return self.integration == "soft_prompt" or self.cross_every_n > 0

    @property
    def cross_layer_indices(self) -> list[int]:
        """Decoder layers that get a gated cross-attention block in front of them."""
        if self.integration != "cross" or self.cross_every_n == 0:
            return []
        n = self.cross_every_n
        return [i for i in range(self.num_layers) if (i + 1) % n == 0]

    @classmethod
    def from_hf(cls, hf: Any, *, integration: str = "cross", cross_every_n: int = 0,
                user_dim: int | None = None, cross_heads: int | None = None,
                cross_intermediate_size: int | None = None) -> "ModelConfig":
        model_type = getattr(hf, "model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if getattr(hf, "use_sliding_window", False) or (
                model_type == "mistral" and getattr(hf, "sliding_window", None)):
            raise ValueError("sliding-window attention is not supported")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported (SwiGLU/silu only)")
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        theta, scaling = _rope_settings(hf)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        # Qwen2 always has q/k/v biases and never an o_proj bias; Llama's flag covers all four.
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            model_type=model_type, integration=integration, cross_every_n=cross_every_n,
            user_dim=user_dim, cross_heads=cross_heads,
            cross_intermediate_size=cross_intermediate_size,
        )


def _rope_settings(hf: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the v5 `rope_parameters` or the older pair of fields."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(getattr(hf, "rope_theta", 10000.0))
        scaling = dict(getattr(hf, "rope_scaling", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    scaling["rope_type"] = kind
    return theta, scaling
