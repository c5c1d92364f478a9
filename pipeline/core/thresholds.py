"""Decision thresholds tuned on OOF predictions, of three kinds: `labels` (per-label thresholds:
multi-label F1), `positive` (one positive-class threshold: binary accuracy / F1) and `cuts`
(cut points between grades: QWK, accuracy on ordinal values). Pure functions; the ensemble stage tunes them under nested CV. Which kind a
metric needs on a task is the task's answer (`Task.threshold_kind`).

A fitted threshold set is what `metrics.score(..., thresholds=)` takes: an array of per-label
thresholds, a float, or (grades, cut points).
"""
from __future__ import annotations

import numpy as np

from pipeline.core import metrics

GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
PASSES = 2


def default(which: str, task):
    """The untuned decisions: 0.5 per label, 0.5, midpoints between grades (rounding)."""
    if which == "labels":
        return np.full(len(task.columns), 0.5)
    if which == "positive":
        return 0.5
    return (np.asarray(task.grades), task.cuts())


def fit(which: str, metric: str, y: np.ndarray, pred: np.ndarray, task):
    """Thresholds maximising `metric` on (y, pred): coordinate search from the defaults, each
    coordinate over a grid (probabilities) or between its neighbouring cut points (grades)."""
    best = default(which, task)

    def scored(th) -> float:
        return metrics.score(metric, task, y, pred, th)

    if which == "positive":
        scores = [scored(t) for t in GRID]
        return float(GRID[int(np.argmax(scores))]) if max(scores) > scored(best) else best
    current = scored(best)
    for _ in range(PASSES):
        if which == "labels":
            values = best.copy()
            for j in range(len(values)):
                for t in GRID:
                    trial = values.copy()
                    trial[j] = t
                    s = scored(trial)
                    if s > current:
                        current, values = s, trial
            best = values
        else:
            grades, cuts = best
            cuts = cuts.copy()
            for j in range(len(cuts)):
                lo, hi = grades[j], grades[j + 1]
                for t in np.linspace(lo, hi, 21)[1:-1]:
                    trial = cuts.copy()
                    trial[j] = t
                    if np.all(np.diff(trial) > 0):
                        s = scored((grades, trial))
                        if s > current:
                            current, cuts = s, trial
            best = (grades, cuts)
    return best


def decide(which: str, pred: np.ndarray, th, task) -> np.ndarray:
    """Predictions whose default decisions are `th`'s decisions (for scoring held-out folds,
    each with its own thresholds, as one OOF)."""
    hard = task.decide(pred, th)
    if which == "labels":
        return hard.astype(np.float64)
    if which == "positive":
        hard = hard.astype(np.float64)
        return np.c_[1 - hard, hard]
    return hard.reshape(-1, 1).astype(np.float64)


def nested(which: str, metric: str, y: np.ndarray, pred: np.ndarray, folds: np.ndarray,
           task) -> tuple[float, dict]:
    """(score, {fold: held-out score}) of thresholds tuned on the other folds, applied to each
    fold's rows: the honest estimate of tuning them."""
    decided = np.zeros_like(pred)
    per_fold = {}
    for f in np.unique(folds):
        rows = folds == f
        th = fit(which, metric, y[~rows], pred[~rows], task)
        decided[rows] = decide(which, pred[rows], th, task)
        per_fold[int(f)] = metrics.score(metric, task, y[rows], decided[rows])
    return metrics.score(metric, task, y, decided), per_fold


def to_json(which: str | None, th) -> dict | None:
    if which is None or th is None:
        return None
    if which == "cuts":
        return dict(kind=which, grades=np.asarray(th[0]).tolist(), cuts=np.asarray(th[1]).tolist())
    return dict(kind=which, values=np.asarray(th).tolist())


def from_json(d: dict | None):
    """A threshold set as `metrics.score` and `Task.decide` take it, or None."""
    if d is None:
        return None
    if d["kind"] == "cuts":
        return (np.asarray(d["grades"]), np.asarray(d["cuts"]))
    return float(d["values"]) if d["kind"] == "positive" else np.asarray(d["values"])
