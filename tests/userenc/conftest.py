"""Fixtures for the user-encoder and training tests: generated data with planted structure
(write_sample_data), its histories and a tokenizer fitted on them. Helpers live in
userenc_helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.data import write_sample_data
from userenc.events import Event, group_by_user
from userenc.readers import read_jsonl
from userenc.spec import FeatureSpec
from userenc.tokenize import EventTokenizer
from userenc_helpers import tiny_spec


@pytest.fixture
def spec() -> FeatureSpec:
    return tiny_spec()


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory) -> Path:
    """150 users of generated JSONL events with planted structure."""
    return write_sample_data(tmp_path_factory.mktemp("sample") / "events.jsonl", users=150, items=120, events_per_user=(12, 30), seed=1)


@pytest.fixture(scope="session")
def sample_histories(sample_file) -> dict[str, list[Event]]:
    return group_by_user(read_jsonl(sample_file).events)


@pytest.fixture(scope="session")
def sample_tokenizer(sample_histories) -> EventTokenizer:
    return EventTokenizer.fit(tiny_spec(), sample_histories.values())
