"""Cost of one personalized request, USER-LLM vs text prompt (used by userllm_vs_text.py).

Latency: time to first token through our engine, one request at a time (batch 1, the prefix
cache reset before each request so nothing is reused), whole prompt prefilled in one step;
the USER-LLM side includes the encoder turning the N-event history into K user tokens. The
arms run in one process with their requests interleaved. Memory: each arm in a fresh process
of its own (spawn), the peak during its requests minus the resident size after loading and
warm-up.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class CostJob:
    model: str
    adapter: str | None
    kind: str  # userllm | text | none
    prompts: list[list[int]]
    histories: list[Any]  # userllm: the events the encoder reads, per prompt
    threads: int = 2


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM), so the peak of
    loading the model does not hide the requests' own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Arm:
    """An engine (and, for USER-LLM, the adapter's encoder) answering one request at a time."""

    def __init__(self, job: CostJob) -> None:
        from llm.engine.engine import Engine
        from llm.engine.sampling_params import SamplingParams
        from training.adapter_checkpoint import load_adapter_encoder

        self.job = job
        longest = max(len(p) for p in job.prompts) + 8
        self.engine = Engine.from_pretrained(job.model, adapter=job.adapter,
                                             kv_cache_bytes=640 << 20, max_num_seqs=4,
                                             max_num_batched_tokens=max(1024, longest))
        self.encoder = load_adapter_encoder(job.adapter) if job.kind == "userllm" else None
        self.one = SamplingParams(temperature=0.0, max_tokens=1)

    def request(self, i: int) -> tuple[float, float]:
        """(seconds to the first token, of which the encoder's), nothing cached."""
        self.engine.reset_prefix_cache()
        t0 = time.perf_counter()
        tokens = (self.encoder.user_tokens([self.job.histories[i]])[0]
                  if self.encoder is not None else None)
        t1 = time.perf_counter()
        self.engine.generate([self.job.prompts[i]], self.one, [tokens])
        return time.perf_counter() - t0, t1 - t0


def _latency(jobs: list[CostJob]) -> list[dict[str, Any]]:
    """Every arm loaded in one process; their requests interleaved (request i of each arm in
    turn), so a slow spell of a shared machine hits all of them alike."""
    import torch

    torch.set_num_threads(jobs[0].threads)
    arms = [_Arm(job) for job in jobs]
    for arm in arms:
        arm.request(0)  # warm-up (first-call allocations), not counted
    times: list[list[tuple[float, float]]] = [[] for _ in arms]
    for i in range(len(jobs[0].prompts)):
        for arm, out in zip(arms, times):
            out.append(arm.request(i))
    results = []
    for arm, out in zip(arms, times):
        ms = np.asarray([t for t, _ in out]) * 1e3
        results.append({"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
                        "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
                        "encoder_ms_mean": float(np.mean([e for _, e in out]) * 1e3),
                        "prompt_tokens_mean": float(np.mean([len(p) for p in arm.job.prompts]))})
        arm.engine.close()
    return results


def _memory(job: CostJob) -> dict[str, float]:
    """Peak resident memory of two requests over the loaded, warmed-up process."""
    import torch

    torch.set_num_threads(job.threads)
    arm = _Arm(job)
    arm.request(0)
    base = _status_mib("VmRSS")
    _reset_peak()
    for i in range(min(2, len(job.prompts))):
        arm.request(i)
    peak = _status_mib("VmHWM")
    arm.engine.close()
    return {"peak_rss_over_loaded_mib": max(0.0, peak - base), "loaded_rss_mib": base}


def measure(jobs: list[CostJob]) -> list[dict[str, Any]]:
    """Latency of the arms side by side in one fresh process, then each arm's memory in a
    fresh process of its own (spawned: the parent's model memory is not inherited)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        latency = pool.apply(_latency, (jobs,))
    out = []
    for job, lat in zip(jobs, latency):
        with ctx.Pool(1) as pool:
            out.append(lat | pool.apply(_memory, (job,)))
    return out


def kv_bytes(model_config, tokens: int, dtype_bytes: int = 4) -> int:
    """Self-attention K/V a request of `tokens` tokens holds in the pool."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * tokens * dtype_bytes


def encoder_flops(encoder, history) -> int:
    """torch's FLOP count of the encoder turning one history into its user tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    ids, valid = encoder.batch([history])
    with FlopCounterMode(display=False) as counter:
        encoder.model.encode(ids, valid)
    return int(counter.get_total_flops())
