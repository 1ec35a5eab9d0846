"""Where a step's host time goes: seconds per phase, summed over steps (always on: a few
clock calls per step). bench/engine_overhead.py reads it and sets `clock` to time.thread_time
(CPU time: a shared machine's other load does not count). On CUDA `forward` is the launch
time unless something syncs (sampling's copy back to the host does)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

PHASES = ("schedule", "prepare", "forward", "sample", "detokenize", "bookkeeping")


@dataclass(slots=True)
class StepProfile:
    schedule: float = 0.0
    prepare: float = 0.0  # inputs, block tables, slot mappings, sampling tensors
    forward: float = 0.0  # model + logits
    sample: float = 0.0
    detokenize: float = 0.0
    bookkeeping: float = 0.0  # the rest: token lists, prefix-cache blocks, outputs, finishing
    steps: int = 0
    clock: Callable[[], float] = field(default=time.perf_counter)

    def reset(self) -> None:
        for f in fields(self):
            if f.name != "clock":
                setattr(self, f.name, 0 if f.name == "steps" else 0.0)

    def snapshot(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in (*PHASES, "steps")}
