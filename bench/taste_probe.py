"""Long-term taste probe for bench/encoder_quality.py (a measurement, not a test).

Question: from what a user did so far, which genre will dominate their NEXT 20 events? Each
user's input is every event but the last 20; the label is the most frequent genre among those
20 (ties by the catalogue's genre order). A linear probe -- multinomial logistic regression with
L2, full-batch L-BFGS in torch (scikit-learn is not in this venv), 5-fold cross-validation over
users -- reads either a model's stored user vector (`embed`) or the 18-number genre-share
profile of the input history. Features are standardized on each training fold.

The 20 label events must never have been trained on, or a learned vector could have memorised
the continuation while the profile cannot: the bench trains with holdout >= 20 for that reason
(`labels_trained_on` in the output says whether that held).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from userenc.events import Event

FUTURE = 20  # the next 20 events
FOLDS = 5
L2 = 1e-3


def _genres(e: Event) -> list[str]:
    g = e.fields.get("genres") or []
    return [str(x) for x in (g if isinstance(g, (list, tuple)) else str(g).split("|"))]


def genre_order(histories: dict[str, list[Event]]) -> list[str]:
    """Every genre seen, most frequent first (ties by name): the profile's columns."""
    counts = Counter(g for h in histories.values() for e in h for g in _genres(e))
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def probe_cases(histories: dict[str, list[Event]], genres: list[str], min_input: int = 1
                ) -> tuple[list[str], list[list[Event]], np.ndarray]:
    """(users, input histories, label index into `genres`) for every user with more than
    FUTURE events (and at least `min_input` input events) whose future has a genre."""
    rank = {g: i for i, g in enumerate(genres)}
    users, inputs, labels = [], [], []
    for user in sorted(histories):
        h = histories[user]
        if len(h) < FUTURE + min_input:
            continue
        counts = Counter(g for e in h[-FUTURE:] for g in _genres(e) if g in rank)
        if not counts:
            continue
        users.append(user)
        inputs.append(h[:-FUTURE])
        labels.append(rank[min(counts, key=lambda g: (-counts[g], rank[g]))])
    return users, inputs, np.asarray(labels, dtype=np.int64)


def genre_profile(inputs: list[list[Event]], genres: list[str]) -> np.ndarray:
    """[users, len(genres)]: each genre's share of the input history's genre mentions."""
    col = {g: i for i, g in enumerate(genres)}
    out = np.zeros((len(inputs), len(genres)), dtype=np.float32)
    for row, h in enumerate(inputs):
        for e in h:
            for g in _genres(e):
                if g in col:
                    out[row, col[g]] += 1
        out[row] /= max(1.0, out[row].sum())
    return out


def _fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, n_classes: int, l2: float) -> np.ndarray:
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy((x_tr - mean) / std).double()
    xe = torch.from_numpy((x_te - mean) / std).double()
    y = torch.from_numpy(y_tr)
    w = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xe @ w + b).argmax(1).numpy()


def probe_accuracy(features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0, l2: float = L2) -> dict[str, float]:
    """5-fold CV accuracy of the L2 logistic probe, and the majority class's accuracy on the
    same folds (what a probe that learned nothing scores)."""
    assert len(features) == len(labels) and len(labels) >= FOLDS, "a probe needs a row per user, at least one per fold"
    order = np.random.default_rng(seed).permutation(len(labels))
    folds = np.array_split(order, FOLDS)
    right = majority = 0
    for k in range(FOLDS):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(FOLDS) if j != k])
        pred = _fit_predict(features[train].astype(np.float64), labels[train], features[test].astype(np.float64), n_classes, l2)
        right += int((pred == labels[test]).sum())
        majority += int((labels[test] == np.bincount(labels[train], minlength=n_classes).argmax()).sum())
    return {"accuracy": right / len(labels), "majority": majority / len(labels), "users": int(len(labels))}
