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
    adapter_of: str | None = None  # decode another arm's adapter (nothing trained)
    prior: bool = False  # next movie's beam search adds the encoder head's prior (weight tuned)


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
        # The same adapter; next movie's beam search adds w * the encoder head's log-prob of
        # each title (training/item_prior.py), w tuned on validation examples.
        ArmSpec("userllm-prior", AdapterConfig(**main), "userllm", adapter_of="userllm",
                prior=True),
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
                   max_len: int, seed: int, row: str = "") -> dict[str, Any]:
    """Train the benchmark's encoder once (kept in the work folder); a fixed number of epochs,
    so a busy machine changes how long it takes, not what comes out. `row`: a row of
    encoder_quality.py (its spec, objectives and training settings such as bf16) instead of
    the default multi-feature encoder; an encoder of another row in `out` is refused."""
    from training.train_encoder import train_encoder
    from userenc.config import EncoderConfig
    from userenc.spec import load_spec

    objectives: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if row:
        from bench.encoder_quality import MODELS

        if row not in MODELS:
            raise SystemExit(f"--encoder-row: no row {row!r} (rows: {', '.join(MODELS)})")
        spec_name, objectives, *extra = MODELS[row]
        training = extra[0] if extra else {}
    state_dir = out.with_name(out.name + ".last")
    if (state_dir / "manifest.json").is_file():
        made = json.loads((state_dir / "manifest.json").read_text()).get("bench_row", "")
        if made != row:
            raise SystemExit(f"{out}: holds the encoder of row {made or '(default)'}, not "
                             f"{row or '(default)'}: give another --work")
    last = state_dir / "state.json"
    if last.is_file():
        state = json.loads(last.read_text())
        if state["epoch"] >= epochs or state["bad_epochs"] >= TrainConfig().patience:
            return json.loads((out / "manifest.json").read_text())
    cfg = EncoderConfig(**(objectives | {"max_len": max_len, "num_user_tokens": 4, "out_dim": 64}))
    tcfg = TrainConfig(**({"epochs": epochs, "batch_size": 32, "seed": seed, "holdout": holdout}
                          | training))
    train_encoder(histories, load_spec(spec_name), cfg, tcfg, out, resume=last.is_file(),
                  progress=True, manifest_extra={"bench_row": row})
    return json.loads((out / "manifest.json").read_text())


def ensure_arm(spec: ArmSpec, histories, model: str, encoder: Path, work: Path,
               seed: int) -> dict[str, Any]:
    """Train an arm's adapter once; returns what it trained (steps, seconds, parameters)."""
    if spec.adapter is None:
        return {"trained": "nothing (zero-shot)", "parameters": {"trained": 0}}
    if spec.adapter_of:
        return {"trained": f"nothing ({spec.adapter_of}'s adapter)", "parameters": {"trained": 0},
                "decodes": spec.adapter_of}
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


PRIOR_WEIGHTS = (0.0, 1.0, 4.0, 16.0, 64.0, 256.0)


def tune_prior_weight(adapter: Path, model: str, examples, cat, weights=PRIOR_WEIGHTS
                      ) -> dict[str, Any]:
    """The item prior's weight with the best next-movie Recall@10 on `examples` (validation
    cuts, never the test tail), ties broken by the reciprocal rank within the beams (a few
    hits decide Recall@10 alone), then by the smaller weight; every weight's figures kept."""
    from training.evaluate_adapter import evaluate_closed, load_arm

    arm = load_arm("prior-tuning", model, adapter, prior_weight=1.0, titles=cat.titles)
    sweep: dict[str, dict[str, float]] = {}
    try:
        for w in weights:
            arm.prior_weight = w
            m = evaluate_closed(arm, examples, cat)["next_movie"]
            sweep[str(w)] = {k: v for k, v in m.items() if k.startswith("recall@")} | {
                "mrr@10": sum(1 / r for r in m["ranks"] if r) / len(m["ranks"])}
            print(f"prior weight {w}: " + json.dumps(sweep[str(w)]), flush=True)
    finally:
        arm.close()
    best = max(weights, key=lambda w: (sweep[str(w)]["recall@10"], sweep[str(w)]["mrr@10"], -w))
    return {"weight": best, "examples": len(examples), "sweep": sweep}
