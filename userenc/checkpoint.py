"""A trained encoder on disk: config.json, model.safetensors, vocab/, manifest.json.

Writes go to a temporary folder that is renamed into place, so a reader never sees half a
checkpoint. The manifest is written by whoever trains (it knows the data and user set).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model

from userenc.config import EncoderConfig
from userenc.events import Event
from userenc.model import UserEncoder
from userenc.spec import FIRST_ID, Feature
from userenc.tokenize import EventTokenizer, gap_id, left_pad_tensors


@dataclass(slots=True)
class LoadedEncoder:
    model: UserEncoder
    tokenizer: EventTokenizer
    manifest: dict[str, Any]
    path: Path
    # The candidate tower's output for the whole catalogue: it depends on the weights alone, so
    # serving computes it once instead of on every ranking (see item_scores).
    _catalogue: torch.Tensor | None = None

    @property
    def version(self) -> str:
        """A short id of these exact weights: the encoder version embeddings are stored under."""
        digest = hashlib.sha256((self.path / "model.safetensors").read_bytes()).hexdigest()
        return f"{self.path.name[:40]}-{digest[:12]}"

    def batch(self, histories: list[list[Event]], device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokenize, left-truncate to max_len and left-pad a batch of histories (an encoder that
        reads the request time gets it unknown here: see request_gap)."""
        encoded = [self.tokenizer.encode(h) for h in histories]
        return left_pad_tensors(encoded, self.tokenizer.spec, self.model.cfg.max_len, device)

    @property
    def request_gap(self) -> Feature | None:
        """The spec's "next_gap" feature, when the encoder reads the time until the request
        (rankings then depend on `now`; embeddings and user tokens are asked without it)."""
        return next((f for f in self.tokenizer.spec.features if f.kind == "time" and f.part == "next_gap"), None)

    @torch.inference_mode()
    def last_states_per_request_gap(self, history: list[Event]) -> torch.Tensor:
        """[buckets, d_model]: the history's latest state for each bucket of the time until the
        request (row b: bucket id FIRST_ID + b), in one batch, so a cache of them answers at any
        later time; `request_gap_row` picks the row for a request time."""
        feature = self.request_gap
        assert feature is not None, "this encoder does not read the request time"
        if not history:
            raise ValueError("cannot rank for an empty history")
        encoded = self.tokenizer.encode(history)
        rows = []
        for bucket in range(FIRST_ID, feature.fixed_size):
            row = dict(encoded)
            row[feature.name] = encoded[feature.name].copy()
            row[feature.name][-1] = bucket
            rows.append(row)
        return self.model.states(*self._ranking_tensors(rows), last_only=True)[:, -1].float()

    def request_gap_row(self, last_event_time: int, now: int) -> int:
        """The row of last_states_per_request_gap for a request at `now`."""
        feature = self.request_gap
        assert feature is not None, "this encoder does not read the request time"
        return gap_id(feature, now - last_event_time) - FIRST_ID

    def embed(self, histories: Iterable[list[Event]], batch_size: int = 256, bf16: bool = False) -> np.ndarray:
        """[N, out_dim] user embeddings (float32), in input order. `bf16` runs the matrix products
        under bf16 autocast (~1.6x faster on CPUs with bf16 dot products; cosine to fp32 ~0.999)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        out, chunk = [], []

        def flush() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out.append(self.model.user_embedding(*self.batch(chunk, device)).float().cpu().numpy())
            chunk.clear()

        for h in histories:
            if not h:
                raise ValueError("cannot embed a user with an empty history")
            chunk.append(h)
            if len(chunk) == batch_size:
                flush()
        if chunk:
            flush()
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.out_dim), dtype=np.float32)

    def _ranking_batch(self, histories: list[list[Event]], now: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The batch a ranking reads, on the model's device, the model in eval mode."""
        if any(not h for h in histories):
            raise ValueError("cannot rank for an empty history")
        return self._ranking_tensors([self.tokenizer.encode(h, now=now) for h in histories])

    def _ranking_tensors(self, encoded: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokenized histories left-padded on the model's device, the model in eval mode."""
        self.model.eval()
        return left_pad_tensors(encoded, self.tokenizer.spec, self.model.cfg.max_len, next(self.model.parameters()).device)

    @torch.inference_mode()
    def last_states(self, histories: list[list[Event]], now: int | None = None) -> torch.Tensor:
        """Each history's latest state [B, d_model] (float32): what the next-item head ranks from."""
        return self.model.states(*self._ranking_batch(histories, now), last_only=True)[:, -1].float()

    def catalogue(self) -> torch.Tensor:
        """The candidate tower's output for every item, computed once (it depends on the weights
        alone)."""
        if self._catalogue is None:
            self.model.eval()
            with torch.inference_mode():
                self._catalogue = self.model.heads.candidates()
        return self._catalogue

    @torch.inference_mode()
    def item_scores(self, states: torch.Tensor) -> torch.Tensor:
        """Next-item scores over the catalogue [B, num_items] from latest states [B, d_model];
        padding and OOV ids score -inf."""
        catalogue = self.catalogue()
        return self.model.heads.item_scores(states.to(catalogue.dtype), catalogue)

    @torch.inference_mode()
    def next_item_scores(self, histories: list[list[Event]], now: int | None = None) -> torch.Tensor:
        """Each history's next-item scores over the catalogue [B, num_items] (float32), with the
        seen bias on the history's items when the encoder was trained with it: its raw scores
        leave the history's items where training's bias would have pushed them down."""
        return self.model.next_item_scores(*self._ranking_batch(histories, now), self.catalogue()).float()

    def user_tokens(self, histories: list[list[Event]], batch_size: int = 64) -> list[torch.Tensor]:
        """The tokens an LLM reads for each history: [K, out_dim] from the Perceiver (or
        [T, out_dim], one per event, without one), float32 on the model's device."""
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        for i in range(0, len(histories), batch_size):
            chunk = histories[i : i + batch_size]
            if any(not h for h in chunk):
                raise ValueError("cannot make user tokens from an empty history")
            tokens, mask = self.model.encode(*self.batch(chunk, device))
            out += [t[m].float() for t, m in zip(tokens, mask)]
        return out


def save_checkpoint(
    folder: str | Path,
    model: UserEncoder,
    tokenizer: EventTokenizer,
    manifest: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Atomically (re)write a checkpoint folder. `extra` tensors (optimizer state for resume)
    go to training_state.safetensors beside the weights; `files` are written as given."""
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=1))
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding tables
        tokenizer.save(tmp / "vocab")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if extra:
            save_file({k: v.contiguous().cpu() for k, v in extra.items()}, str(tmp / "training_state.safetensors"))

    return write_folder_atomically(folder, write)


# Test-only hook: seconds to sleep between moving the old folder aside and renaming the new one
# into place, so the crash tests can kill a run inside that window. Unset in production.
CHECKPOINT_PAUSE_ENV = "USERLLM_TEST_CHECKPOINT_PAUSE"


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary folder beside `folder`, which then replaces `folder` by
    renames: a reader sees the old folder or the new one, never half of one. A process killed
    between the two renames leaves the old folder as `.<name>.old`: `recover_folder` puts it
    back."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
    try:
        write(tmp)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            if pause := float(os.environ.get(CHECKPOINT_PAUSE_ENV) or 0):
                time.sleep(pause)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def recover_folder(folder: str | Path) -> None:
    """Undo what a kill inside write_folder_atomically left: the old folder moved aside with no
    new one in its place goes back, and half-written temporary folders go."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.is_dir() and not folder.exists():
        os.replace(old, folder)
    for tmp in folder.parent.glob(f".{folder.name}.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "vocab"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder} is not an encoder checkpoint ({name} missing)")
    cfg = EncoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tokenizer = EventTokenizer.load(folder / "vocab")
    model = UserEncoder(tokenizer.spec, cfg, tokenizer.item_attributes)
    load_model(model, str(folder / "model.safetensors"))
    model.to(device).eval()
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return LoadedEncoder(model, tokenizer, manifest, folder)
