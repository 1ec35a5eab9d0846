"""`userllm train-encoder | eval-encoder | embed` as a user runs them (subprocesses), bad input
(exit 2, one line on stderr, no checkpoint written), and a 2-process torchrun DDP run on CPU."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from training.data import load_dataset, write_sample_data
from training.evaluate import evaluate, model_scorer
from training.split import leave_one_out, windows
from userenc.checkpoint import load_checkpoint
from userenc_helpers import PYTHON, REPO, assert_equal_state, cli_env, free_port, run_cli

TINY = ["--d-model", "16", "--layers", "1", "--max-len", "16", "--out-dim", "8", "--batch-size", "16", "--lr", "5e-3", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("cli") / "events.jsonl", users=60, items=50, events_per_user=(8, 16), seed=2)


def test_help_lists_the_encoder_commands(tmp_path):
    r = subprocess.run([str(REPO / ".venv" / "bin" / "userllm"), "--help"], env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for command in ("train-encoder", "eval-encoder", "embed"):
        assert command in r.stdout


def test_train_resume_eval_embed(tmp_path, data):
    out = tmp_path / "runs" / "enc"
    r = run_cli(tmp_path, "train-encoder", "--data", str(data), "--format", "jsonl", "--spec", "movielens", "--out", str(out), "--epochs", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "best epoch" in r.stdout and str(out) in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "vocab"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_source"] == str(data.resolve()) and manifest["users"] == 60 and len(manifest["data_sha256"]) == 64
    assert manifest["spec"] == "movielens" and manifest["metrics"]["valid"]["users"] == 60

    r = run_cli(tmp_path, "train-encoder", "--data", str(data), "--format", "jsonl", "--spec", "movielens", "--out", str(out), "--epochs", "3", "--resume", *TINY)
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp_path / "runs" / "enc.last" / "state.json").read_text())
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]

    report = tmp_path / "report.json"
    r = run_cli(tmp_path, "eval-encoder", "--data", str(data), "--format", "jsonl", "--checkpoint", str(out), "--baseline", "--exclude-seen", "--json", str(report), "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6 and all("(excl. seen)" in line and "hr@10=" in line for line in lines[:4])
    assert lines[4].startswith("test cold start, last 1-5 events: encoder HR@10=") and "popularity HR@10=" in lines[4]
    results = json.loads(report.read_text())
    assert sorted(results) == ["test/cold_start", "test/encoder", "test/popularity", "valid/encoder", "valid/popularity"]
    assert set(results.pop("test/cold_start")) == {"1-5", "6-20"}
    for res in results.values():
        assert res["all"]["users"] == 60 and set(res["all"]) >= {"hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "mrr"}
        assert res["exclude_seen"]["hr@10"] >= 0.0
    # The report is the library's evaluation of the same checkpoint.
    loaded = load_checkpoint(out)
    split = leave_one_out(load_dataset(data, "jsonl").histories)
    direct = evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)
    assert results["test/encoder"]["all"] == pytest.approx(direct["all"])

    emb = tmp_path / "emb" / "users.npz"
    r = run_cli(tmp_path, "embed", "--data", str(data), "--format", "jsonl", "--checkpoint", str(out), "--out", str(emb), "--batch-size", "7", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "embedded 60 users (8-d)" in r.stdout
    with np.load(emb) as z:
        users, vectors = z["user_ids"].tolist(), z["embeddings"]
    histories = load_dataset(data, "jsonl").histories
    assert users == sorted(histories) and vectors.shape == (60, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, loaded.embed([histories[u] for u in users]), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in emb.parent.iterdir()) == ["users.npz"]


def _with_bad_second_line(data, path):
    lines = data.read_text().splitlines()
    path.write_text(lines[0] + "\n{not json\n" + "\n".join(lines[1:]) + "\n")
    return path


def test_bad_train_input_exits_2_with_one_line_and_writes_nothing(tmp_path, data):
    bad = _with_bad_second_line(data, tmp_path / "bad.jsonl")
    runs = tmp_path / "runs"
    cases = [
        (["--data", str(tmp_path / "missing.jsonl"), "--format", "jsonl"], "no such file or folder"),
        (["--data", str(data), "--format", "parquet"], "invalid choice: 'parquet'"),
        (["--data", str(data), "--format", "jsonl", "--epochs", "0"], "--epochs: must be > 0"),
        (["--data", str(bad), "--format", "jsonl"], "bad.jsonl:2: invalid JSON"),
        (["--data", str(data), "--format", "jsonl", "--spec", "no_such_spec"], "no built-in spec"),
        (["--data", str(data), "--format", "jsonl", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--data", str(data), "--format", "jsonl", "--crop-prob", "1"], "--crop-prob must be in [0, 1)"),
    ]
    for args, message in cases:
        r = run_cli(tmp_path, "train-encoder", *args, "--out", str(runs / "enc"), *TINY)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and not runs.exists(), args


def test_missing_checkpoint_and_skip_bad(tmp_path, data):
    bad = _with_bad_second_line(data, tmp_path / "bad.jsonl")
    runs = tmp_path / "runs"
    r = run_cli(tmp_path, "eval-encoder", "--data", str(data), "--format", "jsonl", "--checkpoint", str(runs / "enc"))
    assert r.returncode == 2 and "not an encoder checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli(tmp_path, "embed", "--data", str(data), "--format", "jsonl", "--checkpoint", str(runs / "enc"), "--out", str(tmp_path / "e.npz"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.npz").exists(), r.stderr

    # With --skip-bad the malformed line is counted and reported, the rest trains.
    r = run_cli(tmp_path, "train-encoder", "--data", str(bad), "--format", "jsonl", "--skip-bad", "--out", str(runs / "enc"), "--epochs", "1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 malformed lines" in r.stderr and (runs / "enc" / "model.safetensors").is_file()


def test_torchrun_two_process_ddp_on_cpu(tmp_path, data):
    out = tmp_path / "ddp"
    cmd = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "api.cli"]
    cmd += ["train-encoder", "--data", str(data), "--format", "jsonl", "--spec", "movielens", "--out", str(out), "--epochs", "2", *TINY]
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("best epoch") == 1, r.stdout  # rank 0 reports, rank 1 does not

    loaded = load_checkpoint(out)
    histories = load_dataset(data, "jsonl").histories
    split = leave_one_out(histories)
    metrics = evaluate(model_scorer(loaded.model, loaded.tokenizer), loaded.tokenizer, split.test)
    assert metrics["all"]["users"] == 60 and 0.0 <= metrics["all"]["hr@10"] <= 1.0
    assert loaded.embed([histories[u] for u in sorted(histories)[:4]]).shape == (4, 8)
    # Every rank stepped once per global batch of 2 x 16 windows.
    n_windows = sum(len(windows(loaded.tokenizer.encode(h), 16)) for h in split.train.values())
    state = load_file(str(tmp_path / "ddp.last" / "training_state.safetensors"))
    steps = {float(v) for k, v in state.items() if k.endswith(".step")}
    full, rest = divmod(n_windows, 32)
    assert steps == {2.0 * (full + (rest >= 2))}, (steps, n_windows)


def test_ddp_ranks_agree_and_match_one_process_on_the_global_batch(tmp_path, data):
    """Really DDP: both ranks end with the same weights, and those match one process trained on
    the same global batches (2 x 8 windows vs 16) up to float rounding; a process on batches of
    8 (what each rank would do alone) lands far away."""
    driver = str(REPO / "tests" / "userenc" / "ddp_driver.py")
    env = cli_env(tmp_path) | {"PYTHONPATH": str(REPO)}
    cmd = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), driver, str(data), str(tmp_path / "ddp"), "8"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    for name, batch in (("one", "16"), ("alone", "8")):
        r = subprocess.run([str(PYTHON), driver, str(data), str(tmp_path / name), batch], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr
    w = {n: load_file(str(tmp_path / f"{n}.rank0.safetensors")) for n in ("ddp", "one", "alone")}
    assert_equal_state(w["ddp"], load_file(str(tmp_path / "ddp.rank1.safetensors")))

    def gap(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    # Stated tolerance: 1e-5 (fp32 sums in another order over two epochs of AdamW steps; seen
    # here: 7.5e-08, against 0.053 for the process alone on batches of 8).
    assert gap(w["ddp"], w["one"]) <= 1e-5, gap(w["ddp"], w["one"])
    assert gap(w["alone"], w["one"]) > 1e-2, gap(w["alone"], w["one"])
