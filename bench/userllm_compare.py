"""Paired comparisons of USER-LLM against the other arms of userllm_vs_text.py.

Every arm answers the same questions about the same users, so a difference between two arms
is measured per user (the same example answered by both) and its uncertainty comes from a
paired bootstrap over those users. With tens of users a 5-point gap in accuracy is noise; the
interval says whether a "better" is one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP = 2000


def per_example(metrics: dict[str, Any], task: str) -> dict[str, dict[str, float]]:
    """{user: {metric: value}} from an arm's kept per-example results (next_movie: hit@1/5/10;
    genres: correct; review: ROUGE-1 / ROUGE-L F1)."""
    m = metrics.get(task)
    if task == "review":
        if not m or "rouge1_each" not in m:
            return {}
        return {user: {"rouge1": r1, "rougeL": rl}
                for user, r1, rl in zip(m["users"], m["rouge1_each"], m["rougeL_each"])}
    if not m or "ranks" not in m:
        return {}
    out = {}
    for user, rank in zip(m["users"], m["ranks"]):
        r = np.inf if rank is None else rank
        out[user] = ({f"recall@{k}": float(r <= k) for k in (1, 5, 10)} if task == "next_movie"
                     else {"accuracy": float(r == 1)})
    return out


def paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], key: str,
           seed: int = 0) -> dict[str, float] | None:
    """Mean of a - b over the users both answered, with a 95% paired bootstrap interval."""
    users = sorted(set(a) & set(b))
    if not users:
        return None
    diff = np.asarray([a[u][key] - b[u][key] for u in users])
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"users": len(users), "a": float(np.mean([a[u][key] for u in users])),
            "b": float(np.mean([b[u][key] for u in users])), "diff": float(diff.mean()),
            "ci95": [float(lo), float(hi)]}


MAIN_METRIC = {"next_movie": "recall@10", "genre_history": "accuracy",
               "genre_future": "accuracy", "review": "rougeL"}


def _paired_rows(n: str, a: dict[str, Any], b: dict[str, Any], tasks: list[str],
                 vs: str) -> list[dict[str, Any]]:
    """Arm a minus arm b on each task's main metric, over their common users."""
    rows = []
    for task in tasks:
        key = MAIN_METRIC[task]
        p = paired(per_example(a, task), per_example(b, task), key)
        if p is not None:
            rows.append({"n": n, "task": task, "metric": key, "vs": vs} | p)
    return rows


def comparisons(quality: dict[str, dict[str, Any]], tasks: list[str],
                main: str = "userllm") -> list[dict[str, Any]]:
    """USER-LLM minus every other arm, per N and task, on their common users."""
    return [row for n, arms in quality.items() if main in arms
            for other, m in arms.items() if other != main
            for row in _paired_rows(n, arms[main], m, tasks, other)]


def ablation_comparisons(quality: dict[str, dict[str, Any]], tasks: list[str], ref: str,
                         names: list[str]) -> list[dict[str, Any]]:
    """Each ablation minus the reference arm (the same settings but the one changed), per N and
    task, on their common users: "a" is the ablation, "b" the reference."""
    return [row for n, arms in quality.items() if ref in arms
            for name in names if name != ref and name in arms
            for row in _paired_rows(n, arms[name], arms[ref], tasks, name)]


def comparison_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["n"], r["task"], r["metric"], r["vs"], r["users"], round(r["a"], 3),
             round(r["b"], 3), f"{r['diff']:+.3f}",
             f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
             "better" if r["ci95"][0] > 0 else "worse" if r["ci95"][1] < 0 else "not separable"]
            for r in rows]
