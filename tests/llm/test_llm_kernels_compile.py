"""The kernels compile for a real GPU (sm_90) on this GPU-less machine: Triton lowers them to
PTX and runs its bundled ptxas. The interpreter never builds the compiled IR, so this catches
what it cannot (type/layout errors of the compiled path) and checks for register spills.
Runs in a subprocess because the compiler needs TRITON_INTERPRET=0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90_without_spills():
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this Triton build bundles no ptxas ({ptxas})")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "llm.kernels.aot_check", "--arch", "90"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"paged_decode", "combine_splits", "write_kv", "paged_prefill"}
    assert sum(r["kernel"] == "paged_decode" for r in rows) == 4
    assert sum(r["kernel"] == "paged_prefill" for r in rows) == 4
    for r in rows:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
