"""The arms userllm_vs_text.py compares, and how each is trained (a stage already on disk is
reused, so an interrupted benchmark picks up where it stopped)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import AdapterConfig, AdapterTrainConfig, TrainConfig


@dataclass(slots=True)
class ArmSpec:
    name: str
    adapter: AdapterConfig | None  # None: the base model as it is (zero-shot)
    kind: str
    minutes: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)  # AdapterTrainConfig overrides
    ablation: bool = False  # evaluated at the smallest N only


# Ablations of the main USER-LLM arm, each changing one setting (evaluated at the smallest N,
# each trained for --ablation-minutes; "userllm-ref" is the main arm under that same budget).
ABLATIONS: dict[str, dict[str, Any]] = {
    "userllm-ref": {},
    "userllm-proj": {"strategy": "proj"},
    "userllm-lora": {"strategy": "lora"},
    "userllm-softprompt": {"integration": "softprompt"},
    "userllm-K1": {"num_user_tokens": 1},
    "userllm-K16": {"num_user_tokens": 16},
    "userllm-every3": {"cross_every_n": 3},
    "userllm-every15": {"cross_every_n": 15},
}


def ml1m_arms(a: Any) -> list[ArmSpec]:
    """The arms to run: all main arms (and, with --ablations, the ablations), or those --arms
    names."""
    tasks = ["next_movie", "genre_history", "genre_future"]
    main = dict(arm="userllm", strategy="enc", integration="xattn", cross_every_n=6,
                num_user_tokens=4, tasks=tasks)
    arms = [
        ArmSpec("userllm", AdapterConfig(**main), "userllm", a.adapter_minutes),
        # The same, with the encoder's top 16 next items as hint tokens (userenc/item_hints.py).
        ArmSpec("userllm-hints", AdapterConfig(**(main | {"item_hints": 16})), "userllm",
                a.adapter_minutes),
        ArmSpec("text-lora", AdapterConfig(arm="text", strategy="lora", tasks=tasks), "text",
                a.text_minutes, {"lengths": [50], "batch_size": 4, "valid_examples": 48}),
        ArmSpec("none-lora", AdapterConfig(arm="none", strategy="lora", tasks=tasks), "none",
                a.none_minutes),
        ArmSpec("text-zeroshot", None, "text"),
    ]
    if a.ablations:
        arms += [ArmSpec(name, AdapterConfig(**(main | change)), "userllm", a.ablation_minutes,
                         ablation=True) for name, change in ABLATIONS.items()]
    if a.arms:
        unknown = set(a.arms) - {x.name for x in arms}
        assert not unknown, f"unknown arms {sorted(unknown)} (ablations need --ablations)"
        arms = [x for x in arms if x.name in a.arms]
    return arms


def amazon_arms(a: Any) -> list[ArmSpec]:
    tasks = ["review"]
    return [
        ArmSpec("userllm", AdapterConfig(arm="userllm", strategy="enc", cross_every_n=6,
                                         num_user_tokens=4, tasks=tasks), "userllm",
                a.amazon_minutes, {"per_user": 4}),
        ArmSpec("text-lora", AdapterConfig(arm="text", strategy="lora", tasks=tasks), "text",
                a.amazon_minutes, {"per_user": 4, "batch_size": 8}),
        ArmSpec("none-lora", AdapterConfig(arm="none", strategy="lora", tasks=tasks), "none",
                a.amazon_minutes / 2, {"per_user": 4}),
        ArmSpec("text-zeroshot", None, "text"),
    ]


def ensure_encoder(histories, spec_name: str, out: Path, epochs: int, holdout: int,
                   max_len: int, seed: int) -> dict[str, Any]:
    """Train the benchmark's encoder once (kept in the work folder); a fixed number of epochs,
    so a busy machine changes how long it takes, not what comes out."""
    from training.train_encoder import train_encoder
    from userenc.config import EncoderConfig
    from userenc.spec import load_spec

    last = out.with_name(out.name + ".last") / "state.json"
    if last.is_file():
        state = json.loads(last.read_text())
        if state["epoch"] >= epochs or state["bad_epochs"] >= TrainConfig().patience:
            return json.loads((out / "manifest.json").read_text())
    cfg = EncoderConfig(max_len=max_len, num_user_tokens=4, out_dim=64)
    tcfg = TrainConfig(epochs=epochs, batch_size=32, seed=seed, holdout=holdout)
    train_encoder(histories, load_spec(spec_name), cfg, tcfg, out, resume=last.is_file(),
                  progress=True)
    return json.loads((out / "manifest.json").read_text())


def ensure_arm(spec: ArmSpec, histories, model: str, encoder: Path, work: Path,
               seed: int) -> dict[str, Any]:
    """Train an arm's adapter once; returns what it trained (steps, seconds, parameters)."""
    if spec.adapter is None:
        return {"trained": "nothing (zero-shot)", "parameters": {"trained": 0}}
    out = work / spec.name
    if (out / "manifest.json").is_file():
        return json.loads((out / "manifest.json").read_text()) | {"reused": True}
    from training.train_adapter import train_adapter

    tcfg = AdapterTrainConfig(**({"max_minutes": spec.minutes, "epochs": 4, "seed": seed,
                                  "per_user": 1} | spec.train))
    t0 = time.perf_counter()
    result = train_adapter(histories, model, encoder, spec.adapter, tcfg, out, progress=True)
    return json.loads((out / "manifest.json").read_text()) | {
        "steps": result.steps, "wall_seconds": time.perf_counter() - t0}
