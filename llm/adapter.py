"""The LLM side of a trained USER-LLM adapter: how the base model is extended, and its weights.

An adapter folder (written by `userllm train-adapter`) holds, for the LLM:

- `adapter.json`, section "llm": the integration ("cross" or "soft_prompt"), cross_every_n,
  user_dim, optional LoRA settings (rank, alpha, target modules) and whether the base weights
  were trained ("full"); section "base_model": the sha256 of the base checkpoint it was
  trained on.
- `llm.safetensors`: only what was trained: the cross blocks or soft-prompt projection
  (`model.cross_blocks.*`, `model.soft_prompt.*`), LoRA factors in peft's names
  (`...q_proj.lora_A.weight`) and, for "full", the base tensors.

Training injects LoRA with peft (`add_lora`); serving loads the same factors with peft and
merges them into the base weights (`merge_lora`), so the engine runs plain Linear layers:
no extra cost per token. The rest of the adapter folder (the user encoder's side) is read by
the personalization path, never here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_FILE = "adapter.json"
LLM_WEIGHTS = "llm.safetensors"
FORMAT = "userllm-adapter"
# Self-attention projections of the decoder layers (not the cross blocks' own projections).
ATTENTION_TARGETS = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass(slots=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    target_modules: str = ATTENTION_TARGETS
    dropout: float = 0.0

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=self.target_modules,
                          lora_dropout=self.dropout, bias="none")


@dataclass(slots=True)
class LLMAdapterConfig:
    integration: str = "cross"  # "cross" | "soft_prompt" | "none" (text / no-user baselines)
    cross_every_n: int = 0
    user_dim: int | None = None
    lora: LoraSettings | None = None
    trains_base: bool = False  # "full": llm.safetensors carries the base tensors too
    extra: dict[str, Any] = field(default_factory=dict)

    def load_kwargs(self) -> dict[str, Any]:
        """What llm.loader.load_model needs to build the matching architecture."""
        if self.integration == "none":
            return {"cross_every_n": 0, "user_dim": None}
        return {"integration": self.integration, "cross_every_n": self.cross_every_n,
                "user_dim": self.user_dim}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMAdapterConfig":
        d = dict(d)
        lora = d.pop("lora", None)
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"adapter: unknown llm settings {sorted(set(d) - known)}")
        cfg = cls(**d, lora=LoraSettings(**lora) if lora else None)
        if cfg.integration not in ("cross", "soft_prompt", "none"):
            raise ValueError(f"adapter: unknown integration {cfg.integration!r}")
        return cfg


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 over a base checkpoint's weight files (a .gguf, or config.json + *.safetensors):
    what an adapter names as its base model, checked before it is served."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted([*p.glob("*.safetensors"), *p.glob("config.json")])
    if not files:
        files = sorted(p.glob("*.gguf"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def read_adapter(folder: str | Path) -> tuple[LLMAdapterConfig, dict[str, Any]]:
    """(LLM config, the whole adapter.json). Clear errors for a folder that is not an adapter."""
    folder = Path(folder).expanduser()
    meta_path = folder / ADAPTER_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    if not meta_path.is_file() or not (folder / LLM_WEIGHTS).is_file():
        raise ValueError(f"{str(folder)!r} is not an adapter folder "
                         f"({ADAPTER_FILE} and {LLM_WEIGHTS} expected)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err.msg})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} file")
    return LLMAdapterConfig.from_dict(meta.get("llm") or {}), meta


def add_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Inject LoRA (peft) into the target modules. peft freezes everything else; the caller
    decides what trains."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(lora.peft_config(), model)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base Linear and put the base layer back in its place.
    Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged


def split_llm_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(plain tensors: user modules and, for "full", base ones; LoRA factors)."""
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    return {k: v for k, v in state.items() if k not in lora}, lora


def apply_adapter(model: nn.Module, folder: str | Path, cfg: LLMAdapterConfig) -> None:
    """Load an adapter's LLM tensors into a model built with cfg.load_kwargs(), LoRA merged."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LLM_WEIGHTS))
    plain, lora = split_llm_state(state)
    own = model.state_dict()
    unknown = sorted(set(plain) - set(own))
    if unknown:
        raise ValueError(f"adapter weights do not fit this model: unexpected {unknown[:3]}")
    user_keys = {k for k in own if k.startswith(("model.cross_blocks.", "model.soft_prompt."))}
    if user_keys - set(plain):
        raise ValueError(f"adapter lacks user-module weights: {sorted(user_keys - set(plain))[:3]}")
    bad = [k for k, v in plain.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"adapter weights have the wrong shapes: {bad[:3]}")
    with torch.no_grad():
        for k, v in plain.items():
            own[k].copy_(v)
    if cfg.lora is not None:
        if not lora:
            raise ValueError("the adapter declares LoRA but holds no LoRA weights")
        add_lora(model, cfg.lora)
        result = set_peft_model_state_dict(model, lora)
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise ValueError(f"LoRA weights do not fit this model: {missing[:3]}")
        merge_lora(model)
    elif lora:
        raise ValueError("the adapter holds LoRA weights but declares no LoRA settings")
