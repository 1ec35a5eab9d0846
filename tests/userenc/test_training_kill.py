"""kill -9 of `userllm train-encoder` at random points, and inside the checkpoint write (between
moving the old folder aside and renaming the new one into place), then `--resume` until it
ends: the same weights, best checkpoint, optimizer state and loss history as a run never
killed."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import time

from safetensors.torch import load_file

from training.data import write_sample_data
from userenc_helpers import PYTHON, REPO, assert_equal_state, cli_env, run_cli

TINY = ["--d-model", "16", "--layers", "1", "--max-len", "16", "--out-dim", "8", "--batch-size",
        "16", "--lr", "5e-3", "--quiet", "--threads", "1", "--epochs", "6", "--seed", "3",
        "--dropout", "0.1"]


def _saved_epoch(out) -> int:  # noqa: ANN001
    """The last epoch whose training state is on disk (0: none yet)."""
    try:
        return json.loads((out.parent / (out.name + ".last") / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _window_open(out) -> bool:  # noqa: ANN001
    """Inside a checkpoint write's rename window: a folder moved aside, its successor not in."""
    return any((out.parent / f".{name}.old").is_dir() and not (out.parent / name).exists()
               for name in (out.name, out.name + ".last"))


def test_killed_anywhere_then_resumed_equals_straight_run(tmp_path):
    data = write_sample_data(tmp_path / "events.jsonl", users=60, items=50,
                             events_per_user=(8, 16), seed=2)
    train = ["train-encoder", "--data", str(data), "--format", "jsonl", "--spec", "movielens", *TINY]
    straight = tmp_path / "straight" / "enc"
    r = run_cli(tmp_path, *train, "--out", str(straight))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed" / "enc"
    # The pause widens each rename window to 0.4 s, so a kill can be aimed inside it.
    env = cli_env(tmp_path) | {"USERLLM_TEST_CHECKPOINT_PAUSE": "0.4"}
    rng, kills, in_window, runs, saved_before_kill = random.Random(5), 0, 0, 0, []
    while True:
        runs += 1
        assert runs <= 12, "the run never finished"
        log = tmp_path / f"run{runs}.out"
        with log.open("wb") as stdout:
            proc = subprocess.Popen([str(PYTHON), "-m", "api.cli", *train, "--out", str(out),
                                     "--resume"], cwd=REPO, env=env, stdout=stdout,
                                    stderr=subprocess.PIPE)
        aim_at_window = kills % 2 == 0  # alternate: inside a checkpoint write, then anywhere
        saved = _saved_epoch(out)
        started = time.monotonic() + 120
        while proc.poll() is None and "resum" not in log.read_text() and time.monotonic() < started:
            time.sleep(0.005)  # past start-up: it has read what it resumes from
        wait = 60 if aim_at_window else rng.uniform(0.05, 1.5)
        deadline = time.monotonic() + (wait if kills < 4 else 600)  # then let it finish
        while proc.poll() is None and time.monotonic() < deadline:
            saved = max(saved, _saved_epoch(out))
            if aim_at_window and _window_open(out):
                break
            time.sleep(0.005)
        if proc.poll() is not None:  # it finished before the kill
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        in_window += aim_at_window and _window_open(out)
        proc.send_signal(signal.SIGKILL)
        saved_before_kill.append(saved)
        proc.wait(30)
        proc.stderr.close()
        kills += 1
    assert kills >= 3 and in_window >= 1, (kills, in_window)
    # Every run resumed from at least the last state saved before the kill that ended the run
    # before it: no kill, not even one inside a checkpoint write, lost a saved epoch.
    resumed = []
    for n in range(1, runs + 1):
        line = (tmp_path / f"run{n}.out").read_text()
        resumed.append(int(line.split("after epoch ")[1].split()[0]) if "after epoch" in line
                       else 0 if "nothing to resume" in line else -1)
    required = [max(saved_before_kill[:i], default=0) for i in range(runs)]
    assert resumed[0] == 0 and all(r >= need for r, need in zip(resumed, required)), (
        resumed, saved_before_kill)
    assert sum(r >= 1 for r in resumed) >= 2, (resumed, saved_before_kill)

    for name in ("enc", "enc.last"):
        assert_equal_state(load_file(str(straight.parent / name / "model.safetensors")),
                           load_file(str(out.parent / name / "model.safetensors")))
    assert_equal_state(load_file(str(straight.parent / "enc.last" / "training_state.safetensors")),
                       load_file(str(out.parent / "enc.last" / "training_state.safetensors")))
    a = json.loads((straight.parent / "enc.last" / "state.json").read_text())
    b = json.loads((out.parent / "enc.last" / "state.json").read_text())
    assert [(h["epoch"], h["train_loss"], h["valid"]) for h in a["history"]] == \
        [(h["epoch"], h["train_loss"], h["valid"]) for h in b["history"]]
    assert not list(out.parent.glob(".enc*")), "no half-written or moved-aside folder is left"
