"""`userllm train-adapter` and `userllm generate` as a user runs them: erased users never reach
an adapter, `admin stale-models` lists an adapter trained on users erased since, and bad paths
get one clear line with exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import main

pytestmark = pytest.mark.xdist_group("adapter")
REPO = Path(__file__).resolve().parents[2]
TINY_ENCODER = ["--spec", "movielens", "--d-model", "16", "--layers", "1", "--max-len", "32",
                "--out-dim", "8", "--user-tokens", "2", "--epochs", "1", "--batch-size", "16",
                "--quiet", "--threads", "1"]
TINY_ADAPTER = ["--tasks", "genre_history", "--epochs", "1", "--per-user", "1", "--lengths", "12",
                "--valid-examples", "8", "--user-tokens", "2", "--cross-every", "2", "--quiet",
                "--threads", "1"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("USERLLM_DATABASE_URL", "USERLLM_KEYS_DATABASE_URL", "USERLLM_KEK",
                "USERLLM_KEK_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USERLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_erased_users_are_excluded_and_stale_models_lists_the_adapter(home, capsys, sample_events,
                                                                      tiny_llm):
    from store import Store, delete_user

    assert main(["ingest", "--data", str(sample_events), "--format", "jsonl"]) == 0
    with_store = Store.open()
    try:
        delete_user(with_store, "u3")
        erased = with_store.hasher.user("u3")
        users = {u for u, h in with_store.histories() if h}
    finally:
        with_store.close()
    encoder, adapter = home / "runs" / "encoder", home / "runs" / "adapter"
    assert main(["train-encoder", "--from-store", "--out", str(encoder), *TINY_ENCODER]) == 0
    assert main(["train-adapter", "--from-store", "--encoder", str(encoder), "--model",
                 str(tiny_llm), "--out", str(adapter), *TINY_ADAPTER]) == 0
    assert "best valid loss" in capsys.readouterr().out
    hashes = (adapter / "users.keyed-hashes.txt").read_text().split()
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert erased not in hashes and len(hashes) == len(users) == 119
    assert manifest["erasure"]["user_count"] == 119 and manifest["kind"] == "adapter"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["encoder"]["checkpoint"] == str(encoder.resolve())
    assert len(meta["base_model"]["sha256"]) == 64

    assert main(["admin", "stale-models"]) == 0
    assert "STALE" not in capsys.readouterr().out
    with_store = Store.open()
    try:
        delete_user(with_store, "u7")  # trained on by both the encoder and the adapter
    finally:
        with_store.close()
    assert main(["admin", "stale-models"]) == 0
    out = capsys.readouterr().out
    assert f"STALE    {adapter}" in out and f"STALE    {encoder}" in out, out

    # generate answers from the stored history through the adapter; an unknown user falls back.
    assert main(["generate", "--user", "u1", "--adapter", str(adapter), "--max-tokens", "4",
                 "What is my favourite movie genre?"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--user", "nobody", "--adapter", str(adapter), "--max-tokens", "2",
                 "Hello"]) == 0
    assert "without personalization" in capsys.readouterr().err


def test_bad_paths_are_one_line_errors(home, capsys, tmp_path, sample_events, tiny_llm,
                                       tiny_encoder):
    data = ["--data", str(sample_events), "--format", "jsonl"]
    out = ["--out", str(tmp_path / "a"), *TINY_ADAPTER]
    _one_line_error(capsys, ["train-adapter", *data, "--encoder", str(tmp_path / "nope"),
                             "--model", str(tiny_llm), *out], "is not an encoder checkpoint")
    _one_line_error(capsys, ["train-adapter", *data, "--encoder", str(tiny_encoder), "--model",
                             str(tmp_path / "no-model"), *out], "does not exist")
    _one_line_error(capsys, ["train-adapter", *data, "--model", str(tiny_llm), *out],
                    "needs an encoder checkpoint")
    _one_line_error(capsys, ["train-adapter", *data, "--encoder", str(tiny_encoder), "--model",
                             str(tiny_llm), "--tasks", "genre_future", *out[:2]],
                    "--holdout >= 10")
    _one_line_error(capsys, ["train-adapter", *data, "--encoder", str(tiny_encoder), "--model",
                             str(tiny_llm), "--item-hints", "-1", *out], "item_hints")
    _one_line_error(capsys, ["train-adapter", *data, "--encoder", str(tiny_encoder), "--model",
                             str(tiny_llm), "--arm", "text", "--item-hints", "4", *out],
                    "no encoder to give item hints")
    assert not (tmp_path / "a").exists()
    _one_line_error(capsys, ["generate", "--user", "u1", "--adapter", str(tmp_path / "none"),
                             "hi"], "no adapter at")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter.json").write_text("{not json")
    (broken / "llm.safetensors").write_bytes(b"")
    assert main(["ingest", *data]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["generate", "--user", "u1", "--adapter", str(broken), "hi"],
                    "not valid JSON")
    # And as a real process: exit 2, one line, no traceback.
    r = subprocess.run([sys.executable, "-m", "api.cli", "train-adapter", *data, "--encoder",
                        str(tmp_path / "nope"), *out], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
