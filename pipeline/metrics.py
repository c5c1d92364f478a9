"""Competition metrics (scikit-learn's), each knowing its direction, for every task's predictions.

What a prediction array is tells how to read it (pipeline.tasks writes them so):
- class probabilities: `y` (N,) class indices, `pred` (N, K) rows summing to 1 (multiclass,
  binary); label metrics score the argmax, or the positive class at a threshold (binary);
- label probabilities: `y` (N, L) 0/1, `pred` (N, L) (multilabel); decisions at per-label
  thresholds (default 0.5);
- values: `y` (N,) numbers, `pred` (N, 1) (regression, ordinal); decisions (qwk, accuracy) are
  grades: rounding, or (grades, cut points).

A user metric (config `metric: {file, function, direction}`) is a function in a Python file,
imported by path (nothing is evaluated from a string), called `function(ids, truth,
predictions)` with the OOF ids (row numbers where a stage has none), the truth array and the
prediction array as above.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, cohen_kappa_score, f1_score, log_loss,
                             mean_absolute_error, mean_squared_error, r2_score, roc_auc_score)

from pipeline.errors import UserError

HIGHER_IS_BETTER = {"accuracy": True, "log_loss": False, "roc_auc": True, "macro_f1": True,
                    "micro_f1": True, "samples_f1": True, "mean_f1": True, "qwk": True,
                    "rmse": False, "mae": False, "r2": True}
DECISION_METRICS = {"accuracy", "macro_f1", "micro_f1", "samples_f1", "mean_f1", "qwk"}


def load_user_metric(spec):
    """The user metric's function, imported from its file once per process (every OOF score,
    epoch and blend trial calls it); a one-line UserError if absent."""
    path = Path(spec.file)
    if not path.is_file():
        raise UserError(f"metric.file: {path} not found")
    return _user_function(path, spec.function, path.resolve(), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _user_function(path: Path, function: str, *identity):
    """`function` of the file at `path` (as the config names it); `identity` (the resolved
    path and the modification time) keeps files of other folders or edited since apart."""
    module_spec = importlib.util.spec_from_file_location(f"user_metric_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in configs/
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any failure is theirs to fix
        raise UserError(f"metric.file: {path} fails to import ({type(err).__name__}: {err})") \
            from None
    finally:
        sys.dont_write_bytecode = saved
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"metric.function: {path} has no function {function!r}")
    return fn


def name(metric) -> str:
    """The metric's name as scores.json records it: `function:direction` for a user metric."""
    return metric if isinstance(metric, str) else f"{metric.function}:{metric.direction}"


def higher_is_better(metric) -> bool:
    if isinstance(metric, str) and ":" in metric:
        return metric.endswith(":maximize")
    if not isinstance(metric, str):
        return metric.direction == "maximize"
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}")
    return HIGHER_IS_BETTER[metric]


def value_grades(y: np.ndarray, pred: np.ndarray, thresholds=None) -> tuple[np.ndarray, np.ndarray]:
    """(true grades, predicted grades) of value predictions: rounding clipped to the truth's
    range, or `thresholds` = (grades, cut points)."""
    values = np.asarray(pred).reshape(-1)
    if thresholds is None:
        return np.rint(y), np.clip(np.rint(values), np.rint(y).min(), np.rint(y).max())
    return np.rint(y), grade_of(values, *thresholds)


def grade_of(values: np.ndarray, grades, cuts) -> np.ndarray:
    """The grade of each value: the one whose interval between the sorted cut points holds it."""
    grades, cuts = np.asarray(grades, dtype=np.float64), np.asarray(cuts, dtype=np.float64)
    return grades[np.searchsorted(cuts, np.asarray(values).reshape(-1), side="right")]


def decisions(pred: np.ndarray, thresholds=None, per_label: bool = False) -> np.ndarray:
    """Hard decisions of probability predictions: class index (argmax, or the positive class at
    a scalar threshold for two classes) or, `per_label`, 0/1 per label (at per-label
    thresholds)."""
    if per_label:
        t = 0.5 if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return (pred >= t).astype(np.int64)
    if thresholds is not None and pred.shape[1] == 2:
        return (pred[:, 1] >= float(thresholds)).astype(np.int64)
    return pred.argmax(1)


def score(metric, y: np.ndarray, pred: np.ndarray, thresholds=None, ids=None) -> float:
    """The metric of predictions `pred` against truth `y` (see the module doc for the shapes);
    `thresholds` replace the default decisions where the metric needs them."""
    y, pred = np.asarray(y), np.asarray(pred)
    if not isinstance(metric, str):
        fn = load_user_metric(metric)
        return float(fn(np.arange(len(y)) if ids is None else np.asarray(ids), y, pred))
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}")
    if y.ndim == 2:
        return _multilabel(metric, y, pred, thresholds)
    if pred.shape[1] == 1 and y.dtype.kind == "f":
        return _values(metric, y, pred, thresholds)
    return _classes(metric, y, pred, thresholds)


def _classes(metric: str, y, proba, thresholds) -> float:
    labels = np.arange(proba.shape[1])
    if metric == "log_loss":
        return float(log_loss(y, np.clip(proba, 1e-15, 1), labels=labels))
    if metric == "roc_auc":
        if proba.shape[1] == 2:
            return float(roc_auc_score(y, proba[:, 1]))
        return float(roc_auc_score(y, proba, multi_class="ovr", labels=labels))
    hard = decisions(proba, thresholds)
    if metric == "accuracy":
        return float(accuracy_score(y, hard))
    if metric == "qwk":
        return float(cohen_kappa_score(y, hard, weights="quadratic", labels=labels))
    if metric in ("macro_f1", "mean_f1", "micro_f1"):
        average = "micro" if metric == "micro_f1" else "macro"
        return float(f1_score(y, hard, average=average, labels=labels, zero_division=0))
    raise ValueError(f"metric {metric!r} does not apply to class probabilities")


def _multilabel(metric: str, y, proba, thresholds) -> float:
    if metric == "log_loss":
        p = np.clip(proba, 1e-15, 1 - 1e-15)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if metric == "roc_auc":  # mean column AUC over the labels with both outcomes present
        cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
        return float(np.mean([roc_auc_score(y[:, j], proba[:, j]) for j in cols]))
    hard = decisions(proba, thresholds, per_label=True)
    average = {"macro_f1": "macro", "mean_f1": "macro", "micro_f1": "micro",
               "samples_f1": "samples"}.get(metric)
    if average is None:
        raise ValueError(f"metric {metric!r} does not apply to label probabilities")
    return float(f1_score(y.astype(np.int64), hard, average=average, zero_division=0))


def _values(metric: str, y, pred, thresholds) -> float:
    values = pred.reshape(-1)
    if metric == "rmse":
        return float(np.sqrt(mean_squared_error(y, values)))
    if metric == "mae":
        return float(mean_absolute_error(y, values))
    if metric == "r2":
        return float(r2_score(y, values))
    truth, hard = value_grades(y, values, thresholds)
    if metric == "qwk":
        return float(cohen_kappa_score(truth.astype(np.int64), hard.astype(np.int64),
                                       weights="quadratic"))
    if metric == "accuracy":
        return float(accuracy_score(truth, hard))
    raise ValueError(f"metric {metric!r} does not apply to values")


def loss_metric(y: np.ndarray, pred: np.ndarray) -> float:
    """The validation loss logged per epoch: log loss of probabilities, RMSE of values."""
    values = np.asarray(pred).shape[1] == 1 and np.asarray(y).ndim == 1 and y.dtype.kind == "f"
    return score("rmse" if values else "log_loss", y, pred)


def direction(metric) -> str:
    """optuna's study direction for the metric."""
    return "maximize" if higher_is_better(metric) else "minimize"


def better(metric, a: float, b: float) -> bool:
    """Is score `a` better than `b`?"""
    return a > b if higher_is_better(metric) else a < b


def best_key(metric, scores: dict) -> str:
    """The key of the best score (the first one among equals)."""
    best = next(iter(scores))
    for key, value in scores.items():
        if better(metric, value, scores[best]):
            best = key
    return best


def worst(metric) -> float:
    return -np.inf if higher_is_better(metric) else np.inf


def fold_scores(metric, y: np.ndarray, folds: np.ndarray, pred: np.ndarray,
                thresholds=None) -> dict:
    """{fold: metric on that fold's rows}."""
    return {int(f): score(metric, y[folds == f], pred[folds == f], thresholds)
            for f in np.unique(folds)}
