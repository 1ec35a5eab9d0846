"""Helpers for the user-encoder and training tests: tiny specs, tiny models, CLI runs.
Everything is small (d_model 16-32, 1-2 layers, ~100-300 users) so the whole area runs in a
couple of minutes on two cores."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import torch

from userenc.config import EncoderConfig
from userenc.model import UserEncoder
from userenc.spec import Feature, FeatureSpec

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
SHARED = REPO.parent / "shared"


def tiny_spec() -> FeatureSpec:
    """Every feature kind, small widths: item, genres (multi-valued, item attribute), rating
    buckets, gap/hour/weekday."""
    return FeatureSpec(
        "tiny",
        [
            Feature("item", "categorical", source="item_id", dim=8, target=True),
            Feature("genres", "multi_categorical", dim=4, max_values=3, item_attribute=True, target=True, loss_weight=0.5),
            Feature("rating", "numeric", dim=4, boundaries=[1.5, 2.5, 3.5, 4.5], target=True, loss_weight=0.5),
            Feature("gap", "time", part="gap", dim=4),
            Feature("hour", "time", part="hour", dim=4),
            Feature("weekday", "time", part="weekday", dim=4),
        ],
    )


def tiny_config(spec: FeatureSpec, vocab_sizes: dict[str, int], **overrides) -> EncoderConfig:
    settings = dict(d_model=16, n_layers=1, n_heads=2, ffn_mult=2, max_len=16, dropout=0.0, out_dim=8, vocab_sizes=vocab_sizes)
    settings.update(overrides)
    return EncoderConfig(**settings)


def random_ids(spec: FeatureSpec, vocab_sizes: dict[str, int], batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random real ids (>= 2) per feature, shaped like a batch the tokenizer would produce."""
    out = {}
    for f in spec.features:
        shape = (batch, length, f.max_values) if f.kind == "multi_categorical" else (batch, length)
        out[f.name] = torch.randint(2, vocab_sizes[f.name], shape, generator=generator)
    return out


def vocab_sizes_of(tokenizer) -> dict[str, int]:
    """Each feature's vocabulary size, as train_encoder fills EncoderConfig.vocab_sizes."""
    return {f.name: tokenizer.vocab_size(f) for f in tokenizer.spec.features}


def make_model(spec: FeatureSpec, vocab_sizes: dict[str, int], seed: int = 0, item_attributes=None, **overrides) -> UserEncoder:
    torch.manual_seed(seed)
    model = UserEncoder(spec, tiny_config(spec, vocab_sizes, **overrides), item_attributes)
    # Break the small-init symmetry a little so differences show in the states.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TINY_VOCAB = {"item": 30, "genres": 9, "rating": 7, "gap": 14, "hour": 26, "weekday": 9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("USERLLM_DATABASE_URL", "USERLLM_KEYS_DATABASE_URL")}  # no store: read files only
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", USERLLM_THREADS="1", USERLLM_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    return env


def run_cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "api.cli", *args], cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def assert_equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{k} differs by {diff}"

