"""A trained adapter on disk: only what stage 2 trained, and what it was trained on.

    <folder>/adapter.json        format, arm, strategy, settings; the LLM side (llm/adapter.py);
                                 the base model's sha256; the encoder checkpoint it reads, with
                                 the sha256 of that checkpoint's weights
    <folder>/llm.safetensors     trained LLM tensors (user modules, LoRA factors, or all: full)
    <folder>/encoder.safetensors trained encoder tensors (resampler + projection, or all)
    <folder>/manifest.json       data, tasks, users (the erasure section), metrics, versions

The encoder checkpoint itself is not copied: the adapter names it, and loading refuses a
checkpoint whose weights changed since (the user tokens would no longer be the trained ones).
Writes go to a temporary folder renamed into place, as for encoder checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm.adapter import ADAPTER_FILE, FORMAT, LLM_WEIGHTS, lora_state_dict, read_adapter
from training.userllm import AdapterConfig, UserLLM
from userenc.checkpoint import LoadedEncoder, load_checkpoint, write_folder_atomically
from userenc.config import EncoderConfig
from userenc.model import UserEncoder

ENCODER_WEIGHTS = "encoder.safetensors"
VERSION = 1


def weights_sha256(encoder_dir: str | Path) -> str:
    return hashlib.sha256((Path(encoder_dir) / "model.safetensors").read_bytes()).hexdigest()


def encoder_with_tokens(encoder_dir: str | Path, k: int, device: str | torch.device = "cpu",
                        item_hints: int = 0, out_dim: int | None = None) -> LoadedEncoder:
    """An encoder checkpoint with a resampler of K latents (and M item hints, user tokens of
    width out_dim). A checkpoint trained with other settings keeps every tensor whose shape
    fits; the rest (the latents, a resized projection) start fresh from the global RNG (seed
    it first), and the hints' table starts at 0 for the caller to fill."""
    loaded = load_checkpoint(encoder_dir)
    change = {"num_user_tokens": k, "item_hints": item_hints,
              "out_dim": out_dim or loaded.model.cfg.out_dim}
    old = loaded.model.cfg.to_dict()
    if all(old[key] == v for key, v in change.items()):
        return LoadedEncoder(loaded.model.to(device), loaded.tokenizer, loaded.manifest,
                             loaded.path)
    cfg = EncoderConfig.from_dict(old | change)
    model = UserEncoder(loaded.tokenizer.spec, cfg, loaded.tokenizer.item_attributes)
    own = model.state_dict()
    model.load_state_dict({n: t for n, t in loaded.model.state_dict().items()
                           if n in own and own[n].shape == t.shape}, strict=False)
    return LoadedEncoder(model.to(device).eval(), loaded.tokenizer, loaded.manifest, loaded.path)


def _hint_table(model: UserLLM) -> dict[str, torch.Tensor]:
    """The item-hint table (a buffer, never trained, but part of what the adapter reads)."""
    hints = model.encoder.hints if model.encoder is not None else None
    return {} if hints is None else {"hints.table": hints.table.detach().contiguous().cpu()}


def _trained(model: UserLLM, prefix: str) -> dict[str, torch.Tensor]:
    return {n[len(prefix):]: p.detach().contiguous().cpu()
            for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)
            and ".lora_" not in n}


def save_adapter(folder: str | Path, model: UserLLM, meta: dict[str, Any],
                 manifest: dict[str, Any], files: dict[str, str] | None = None,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """meta: {"base_model": {...}, "encoder": {...} | None}. `extra` (optimizer state for
    resume) goes to training_state.safetensors; `files` are written as given."""
    cfg = model.cfg
    user_dim = model.encoder.cfg.out_dim if model.encoder is not None else None

    def write(tmp: Path) -> None:
        llm_state = _trained(model, "llm.")
        if cfg.uses_lora:
            llm_state |= {k: v.contiguous().cpu() for k, v in lora_state_dict(model.llm).items()}
        save_file(llm_state, str(tmp / LLM_WEIGHTS))
        if model.encoder is not None:
            save_file(_trained(model, "encoder.") | _hint_table(model), str(tmp / ENCODER_WEIGHTS))
        doc = {"format": FORMAT, "version": VERSION, "arm": cfg.arm, "strategy": cfg.strategy,
               "config": cfg.to_dict(), "llm": cfg.llm_config(user_dim).to_dict()} | meta
        (tmp / ADAPTER_FILE).write_text(json.dumps(doc, indent=1))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if extra:
            save_file({k: v.contiguous().cpu() for k, v in extra.items()},
                      str(tmp / "training_state.safetensors"))

    return write_folder_atomically(folder, write)


def adapter_meta(folder: str | Path) -> dict[str, Any]:
    return read_adapter(folder)[1]


def adapter_encoder_checkpoint(folder: str | Path, encoder_dir: str | Path | None = None
                               ) -> Path:
    """The stage-1 encoder checkpoint an adapter names (or `encoder_dir`, its new place),
    checked unchanged since the adapter was trained on it."""
    enc = adapter_meta(folder).get("encoder")
    if not enc:
        raise ValueError("the adapter names no encoder (not a USER-LLM adapter)")
    path = Path(encoder_dir or enc["checkpoint"])
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the adapter's encoder checkpoint {str(path)!r} is missing "
                                "(give its new place with --encoder)")
    if weights_sha256(path) != enc["weights_sha256"]:
        raise ValueError(f"encoder checkpoint {str(path)!r} changed since the adapter was "
                         "trained on it (weights sha256 differs): retrain the adapter")
    return path


def load_adapter_encoder(folder: str | Path, device: str | torch.device = "cpu",
                         encoder_dir: str | Path | None = None) -> LoadedEncoder | None:
    """The encoder side of an adapter (None for the text / none arms): the named encoder
    checkpoint, checked unchanged, with the adapter's trained tensors loaded over it."""
    folder = Path(folder)
    enc = adapter_meta(folder).get("encoder")
    if not enc:
        return None
    path = adapter_encoder_checkpoint(folder, encoder_dir)
    loaded = encoder_with_tokens(path, int(enc["num_user_tokens"]), device,
                                 int(enc.get("item_hints", 0)), enc.get("out_dim"))
    trained = load_file(str(folder / ENCODER_WEIGHTS))
    own = dict(loaded.model.named_parameters()) | dict(loaded.model.named_buffers())
    bad = [k for k, v in trained.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"adapter encoder weights do not fit the encoder: {bad[:3]}")
    with torch.no_grad():
        for k, v in trained.items():
            own[k].copy_(v)
    loaded.model.eval()
    return loaded


def adapter_config(folder: str | Path) -> AdapterConfig:
    return AdapterConfig(**adapter_meta(folder)["config"])
