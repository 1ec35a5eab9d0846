"""Fixtures for the USER-LLM adapter tests: generated events with a planted user signal (each
user prefers two genres), a tiny encoder trained on them, and a tiny chat LLM."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapter_helpers import make_tiny_chat_llm


@pytest.fixture(scope="session")
def sample_events(tmp_path_factory) -> Path:
    from training.data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("adapter-data") / "events.jsonl",
                             users=120, items=80, events_per_user=(16, 30), seed=3)


@pytest.fixture(scope="session")
def sample_histories(sample_events):
    from userenc.events import group_by_user
    from userenc.readers import read_jsonl

    return group_by_user(read_jsonl(sample_events).events)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    return make_tiny_chat_llm(tmp_path_factory.mktemp("tiny-llm") / "llm")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, sample_histories) -> Path:
    """A small encoder (d_model 32, K = 2 user tokens), one epoch: the adapter's starting point."""
    from training.config import TrainConfig
    from training.train_encoder import train_encoder
    from userenc.config import EncoderConfig
    from userenc.spec import load_spec

    out = tmp_path_factory.mktemp("tiny-encoder") / "enc"
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=2, max_len=64, out_dim=16,
                        num_user_tokens=2, dropout=0.0)
    train_encoder(sample_histories, load_spec("movielens").only(["item", "genres", "rating"]),
                  cfg, TrainConfig(epochs=1, batch_size=32, lr=5e-3), out, progress=False)
    return out
