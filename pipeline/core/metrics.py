"""The metric registry: each competition metric once, with its direction, whether it scores
hard decisions, and the task kinds it fits (scikit-learn's implementations).

How a prediction array reads is the task's answer (`Task.predicts`, pipeline.core.tasks):
- `classes`: `y` (N,) class indices, `pred` (N, K) rows summing to 1 (multiclass, binary);
- `labels`: `y` (N, L) 0/1, `pred` (N, L) label probabilities (multilabel);
- `values`: `y` (N,) numbers, `pred` (N, 1) (regression, ordinal).
A decision metric scores the task's hard decisions (`Task.decisions`: argmax or a
positive-class threshold, 0/1 per label, grades), at tuned thresholds where given.

A user metric (config `metric: {file, function, direction}`) is a function in a Python file,
imported by path (nothing is evaluated from a string), called `function(ids, truth,
predictions)` with the OOF ids (row numbers where a stage has none), the truth array and the
prediction array as above.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import (accuracy_score, cohen_kappa_score, f1_score, log_loss,
                             mean_absolute_error, mean_squared_error, r2_score, roc_auc_score)

from pipeline.core.errors import UserError

CLASS_TASKS = ("multiclass", "binary")


@dataclass(frozen=True)
class Metric:
    """A metric: `on` scores predictions of each kind it reads (prediction kind -> fn(y, pred));
    a decision metric has `decisions` instead: fn(truth, hard decisions, labels)."""

    name: str
    higher_is_better: bool
    tasks: tuple[str, ...]
    on: dict[str, Callable] = field(default_factory=dict)
    decisions: Callable | None = None

    @property
    def needs_decisions(self) -> bool:
        return self.decisions is not None


def _class_log_loss(y, proba):
    return log_loss(y, np.clip(proba, 1e-15, 1), labels=np.arange(proba.shape[1]))


def _label_log_loss(y, proba):
    p = np.clip(proba, 1e-15, 1 - 1e-15)
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))


def _class_auc(y, proba):
    if proba.shape[1] == 2:
        return roc_auc_score(y, proba[:, 1])
    return roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(proba.shape[1]))


def _label_auc(y, proba):
    """Mean column AUC over the labels with both outcomes present."""
    cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return np.mean([roc_auc_score(y[:, j], proba[:, j]) for j in cols])


def _f1(average: str) -> Callable:
    return lambda truth, hard, labels: f1_score(truth, hard, average=average, labels=labels,
                                                zero_division=0)


def _values(fn: Callable) -> dict[str, Callable]:
    return {"values": lambda y, pred: fn(y, pred.reshape(-1))}


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, CLASS_TASKS + ("ordinal",),
           decisions=lambda truth, hard, labels: accuracy_score(truth, hard)),
    Metric("log_loss", False, CLASS_TASKS + ("multilabel",),
           on={"classes": _class_log_loss, "labels": _label_log_loss}),
    Metric("roc_auc", True, CLASS_TASKS + ("multilabel",),
           on={"classes": _class_auc, "labels": _label_auc}),
    Metric("macro_f1", True, CLASS_TASKS + ("multilabel",), decisions=_f1("macro")),
    Metric("micro_f1", True, CLASS_TASKS + ("multilabel",), decisions=_f1("micro")),
    Metric("samples_f1", True, ("multilabel",), decisions=_f1("samples")),
    Metric("mean_f1", True, ("multilabel",), decisions=_f1("macro")),
    Metric("rmse", False, ("regression", "ordinal"),
           on=_values(lambda y, v: np.sqrt(mean_squared_error(y, v)))),
    Metric("mae", False, ("regression", "ordinal"), on=_values(mean_absolute_error)),
    Metric("r2", True, ("regression", "ordinal"), on=_values(r2_score)),
    Metric("qwk", True, CLASS_TASKS + ("regression", "ordinal"),
           decisions=lambda truth, hard, labels: cohen_kappa_score(
               truth, hard, weights="quadratic", labels=labels)),
)}
NAMES = tuple(REGISTRY)


def unknown(name: str) -> str:
    """What to say of a metric name that is not registered: the closest names."""
    close = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.5) or \
        [n for n in NAMES if name and (name in n or n in name)][:1]
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown metric {name}{hint} (one of {', '.join(NAMES)})"


def fitting(task_kind: str) -> list[str]:
    """The metrics that fit a task kind, in registry order."""
    return [m.name for m in REGISTRY.values() if task_kind in m.tasks]


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
    if metric not in REGISTRY:
        raise ValueError(f"unknown metric {metric!r}")
    return REGISTRY[metric].higher_is_better


def needs_decisions(metric) -> bool:
    """Whether the metric scores hard decisions (a user metric scores what it is given)."""
    return isinstance(metric, str) and REGISTRY[metric].needs_decisions


def score(metric, task, y: np.ndarray, pred: np.ndarray, thresholds=None, ids=None) -> float:
    """The metric of predictions `pred` against truth `y` on `task` (see the module doc);
    `thresholds` replace the task's default decisions where the metric takes decisions."""
    y, pred = np.asarray(y), np.asarray(pred)
    if not isinstance(metric, str):
        fn = load_user_metric(metric)
        return float(fn(np.arange(len(y)) if ids is None else np.asarray(ids), y, pred))
    if metric not in REGISTRY:
        raise ValueError(f"unknown metric {metric!r}")
    m = REGISTRY[metric]
    if m.needs_decisions:
        truth, hard = task.decisions(y, pred, thresholds)
        return float(m.decisions(truth, hard, task.decision_labels))
    if task.predicts not in m.on:
        raise ValueError(f"metric {metric!r} does not apply to {task.predicts}")
    return float(m.on[task.predicts](y, pred))


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


def fold_scores(metric, task, y: np.ndarray, folds: np.ndarray, pred: np.ndarray,
                thresholds=None) -> dict:
    """{fold: metric on that fold's rows}."""
    return {int(f): score(metric, task, y[folds == f], pred[folds == f], thresholds)
            for f in np.unique(folds)}
