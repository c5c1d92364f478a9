"""Decision thresholds tuned on OOF predictions: per-label thresholds (multi-label F1), one
positive-class threshold (binary accuracy / F1), cut points between grades (QWK, accuracy on
ordinal or regression values). Pure functions; the ensemble stage tunes them under nested CV.

A fitted threshold set is what `metrics.score(..., thresholds=)` takes: an array of per-label
thresholds, a float, or (grades, cut points).
"""
from __future__ import annotations

import numpy as np

from pipeline import metrics

GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
PASSES = 2


def kind(metric, task) -> str | None:
    """Which thresholds the metric needs on the task's predictions: `labels`, `binary`, `cuts`,
    or None (the metric scores the predictions themselves, or is a user metric)."""
    if not isinstance(metric, str) or metric not in metrics.DECISION_METRICS:
        return None
    if task.kind == "multilabel":
        return "labels"
    if task.kind == "binary" and metric != "qwk":
        return "binary"
    if task.kind == "ordinal" and metric in ("qwk", "accuracy"):
        return "cuts"
    return None


def default(which: str, task):
    """The untuned decisions: 0.5 per label, 0.5, midpoints between grades (rounding)."""
    if which == "labels":
        return np.full(len(task.columns), 0.5)
    if which == "binary":
        return 0.5
    return (task.grades, task.cuts())


def fit(which: str, metric: str, y: np.ndarray, pred: np.ndarray, task):
    """Thresholds maximising `metric` on (y, pred): coordinate search from the defaults, each
    coordinate over a grid (probabilities) or between its neighbouring cut points (grades)."""
    best = default(which, task)
    if which == "binary":
        scores = [metrics.score(metric, y, pred, t) for t in GRID]
        return float(GRID[int(np.argmax(scores))]) if max(scores) > \
            metrics.score(metric, y, pred, best) else best
    current = metrics.score(metric, y, pred, best)
    for _ in range(PASSES):
        if which == "labels":
            values = best.copy()
            for j in range(len(values)):
                for t in GRID:
                    trial = values.copy()
                    trial[j] = t
                    s = metrics.score(metric, y, pred, trial)
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
                        s = metrics.score(metric, y, pred, (grades, trial))
                        if s > current:
                            current, cuts = s, trial
            best = (grades, cuts)
    return best


def decide(which: str, pred: np.ndarray, th, task) -> np.ndarray:
    """Predictions whose default decisions are `th`'s decisions (for scoring held-out folds,
    each with its own thresholds, as one OOF)."""
    if which == "labels":
        return (pred >= np.asarray(th)).astype(np.float64)
    if which == "binary":
        hard = (pred[:, 1] >= th).astype(np.float64)
        return np.c_[1 - hard, hard]
    return task.grade(pred[:, 0], th[1]).reshape(-1, 1).astype(np.float64)


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
        per_fold[int(f)] = metrics.score(metric, y[rows], decided[rows])
    return metrics.score(metric, y, decided), per_fold


def to_json(which: str | None, th) -> dict | None:
    if which is None or th is None:
        return None
    if which == "cuts":
        return dict(kind=which, grades=np.asarray(th[0]).tolist(), cuts=np.asarray(th[1]).tolist())
    return dict(kind=which, values=np.asarray(th).tolist())


def from_json(d: dict | None):
    """A threshold set as `metrics.score` and `submit.format_submission` take it, or None."""
    if d is None:
        return None
    if d["kind"] == "cuts":
        return (np.asarray(d["grades"]), np.asarray(d["cuts"]))
    return float(d["values"]) if d["kind"] == "binary" else np.asarray(d["values"])
