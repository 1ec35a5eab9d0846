"""Cost of one personalized request, USER-LLM vs text prompt (used by userllm_vs_text.py).

Latency: time to first token through our engine, one request at a time (batch 1, the prefix
cache reset before each request so nothing is reused), whole prompt prefilled in one step;
the USER-LLM side includes the encoder turning the N-event history into K user tokens. Each
arm runs in a fresh process (spawn), so its peak resident memory is its own: we report the
peak during the requests minus the resident size after loading and warm-up.
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


def _run(job: CostJob) -> dict[str, Any]:
    import torch

    from llm.engine.engine import Engine
    from llm.engine.sampling_params import SamplingParams
    from training.adapter_checkpoint import load_adapter_encoder

    torch.set_num_threads(job.threads)
    longest = max(len(p) for p in job.prompts) + 8
    engine = Engine.from_pretrained(job.model, adapter=job.adapter, kv_cache_bytes=640 << 20,
                                    max_num_seqs=4, max_num_batched_tokens=max(1024, longest))
    encoder = load_adapter_encoder(job.adapter) if job.kind == "userllm" else None
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def request(i: int) -> tuple[float, float]:
        engine.reset_prefix_cache()
        t0 = time.perf_counter()
        tokens = encoder.user_tokens([job.histories[i]])[0] if encoder is not None else None
        t1 = time.perf_counter()
        engine.generate([job.prompts[i]], one, [tokens])
        return time.perf_counter() - t0, t1 - t0

    request(0)  # warm-up (first-call allocations), not counted
    base = _status_mib("VmRSS")
    _reset_peak()
    times, enc = zip(*(request(i) for i in range(len(job.prompts))))
    peak = _status_mib("VmHWM")
    engine.close()
    ms = np.asarray(times) * 1e3
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "encoder_ms_mean": float(np.mean(enc) * 1e3),
            "prompt_tokens_mean": float(np.mean([len(p) for p in job.prompts])),
            "peak_rss_over_loaded_mib": max(0.0, peak - base), "loaded_rss_mib": base}


def measure(job: CostJob) -> dict[str, Any]:
    """Run one arm's requests in a fresh process and return its latency / memory figures."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_run, (job,))


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
