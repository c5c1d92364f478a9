"""The metric registry: each competition metric once, with its direction, whether it scores
hard decisions, and the task kinds it fits (scikit-learn's implementations).

How a prediction array reads is the task's answer (`Task.predicts`, pipeline.core.tasks):
- `classes`: `y` (N,) class indices, `pred` (N, K) rows summing to 1 (multiclass, binary);
- `labels`: `y` (N, L) 0/1, `pred` (N, L) label probabilities (multilabel);
- `values`: `y` (N,) numbers, `pred` (N, 1) (regression, ordinal).
A decision metric scores the task's hard decisions (`Task.decisions`: argmax or a
positive-class threshold, 0/1 per label, grades), at tuned thresholds where given.

A metric in a config is a registered name (`metric: samples_f1`), a name with options
(`metric: {name: samples_f1, zero_division: 1}`: the F1 of a row or label with neither true nor
predicted labels, 0 by default as in scikit-learn, 1 where a competition counts an empty
prediction of an empty truth as right), or a user metric (`metric: {file, function,
direction}`): a function in a Python file, imported by path (nothing is evaluated from a
string), called `function(ids, truth, predictions)` with the OOF ids (row numbers where a stage
has none), the truth array and the prediction array as above.
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
    a decision metric has `decisions` instead: fn(truth, hard decisions, labels). `fold_mean`:
    its CV is the mean of the folds' scores rather than the pooled OOF's (a rank metric pools
    fold models of different calibrations badly, while the test predictions, one average of
    every fold model, are ranked consistently)."""

    name: str
    higher_is_better: bool
    tasks: tuple[str, ...]
    on: dict[str, Callable] = field(default_factory=dict)
    decisions: Callable | None = None
    fold_mean: bool = False

    @property
    def needs_decisions(self) -> bool:
        return self.decisions is not None


def _class_log_loss(y, proba):
    return log_loss(y, np.clip(proba, 1e-15, 1), labels=np.arange(proba.shape[1]))


def _label_log_loss(y, proba):
    p = np.clip(proba, 1e-15, 1 - 1e-15)
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))


_NOTED: set = set()


def _class_auc(y, proba):
    """Binary AUC of the positive class, or the mean one-vs-rest AUC over the classes present
    in `y` (scikit-learn's macro OvR when all are; a printed note once when some are not)."""
    if proba.shape[1] == 2:
        return roc_auc_score(y, proba[:, 1])
    present = np.unique(y)
    if len(present) < proba.shape[1] and tuple(present) not in _NOTED:
        _NOTED.add(tuple(present))
        print(f"note: roc_auc: {proba.shape[1] - len(present)} of {proba.shape[1]} classes absent "
              f"from the scored rows; the mean over the {len(present)} present", file=sys.stderr)
    return np.mean([roc_auc_score(y == c, proba[:, c]) for c in present])


def _label_auc(y, proba):
    """Mean column AUC over the labels with both outcomes present."""
    cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return np.mean([roc_auc_score(y[:, j], proba[:, j]) for j in cols])


def _f1(average: str) -> Callable:
    return lambda truth, hard, labels, zero_division=0: f1_score(
        truth, hard, average=average, labels=labels, zero_division=zero_division)


def _values(fn: Callable) -> dict[str, Callable]:
    return {"values": lambda y, pred: fn(y, pred.reshape(-1))}


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, CLASS_TASKS + ("ordinal",),
           decisions=lambda truth, hard, labels, **_: accuracy_score(truth, hard)),
    Metric("log_loss", False, CLASS_TASKS + ("multilabel",),
           on={"classes": _class_log_loss, "labels": _label_log_loss}),
    Metric("roc_auc", True, CLASS_TASKS + ("multilabel",),
           on={"classes": _class_auc, "labels": _label_auc}, fold_mean=True),
    Metric("macro_f1", True, CLASS_TASKS + ("multilabel",), decisions=_f1("macro")),
    Metric("micro_f1", True, CLASS_TASKS + ("multilabel",), decisions=_f1("micro")),
    Metric("samples_f1", True, ("multilabel",), decisions=_f1("samples")),
    Metric("mean_f1", True, ("multilabel",), decisions=_f1("macro")),
    Metric("rmse", False, ("regression", "ordinal"),
           on=_values(lambda y, v: np.sqrt(mean_squared_error(y, v)))),
    Metric("mae", False, ("regression", "ordinal"), on=_values(mean_absolute_error)),
    Metric("r2", True, ("regression", "ordinal"), on=_values(r2_score)),
    Metric("qwk", True, CLASS_TASKS + ("regression", "ordinal"),
           decisions=lambda truth, hard, labels, **_: cohen_kappa_score(
               truth, hard, weights="quadratic", labels=labels)),
)}
NAMES = tuple(REGISTRY)


def unknown(name: str) -> str:
    """What to say of a metric name that is not registered: the closest names."""
    close = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.5) or \
        [n for n in NAMES if name and (name in n or n in name)][:1]
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown metric {name}{hint} (one of {', '.join(NAMES)})"


F1_METRICS = ("macro_f1", "micro_f1", "samples_f1", "mean_f1")  # those with a zero_division option


def is_user(metric) -> bool:
    """A user metric (a function in a file), not a registered one."""
    return hasattr(metric, "function")


def base(metric) -> str | None:
    """The registered name of a metric (a name, or a name with options); None for a user metric."""
    return None if is_user(metric) else metric if isinstance(metric, str) else metric.name


def _options(metric) -> dict:
    return {} if isinstance(metric, str) else {"zero_division": metric.zero_division}


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
    """The metric's name as scores.json records it: `function:direction` for a user metric,
    `name[zero_division=1]` for a name with other options than the defaults."""
    if is_user(metric):
        return f"{metric.function}:{metric.direction}"
    if isinstance(metric, str) or not metric.zero_division:
        return base(metric)
    return f"{metric.name}[zero_division={metric.zero_division:g}]"


def higher_is_better(metric) -> bool:
    if isinstance(metric, str) and ":" in metric:
        return metric.endswith(":maximize")
    if is_user(metric):
        return metric.direction == "maximize"
    named = base(metric).split("[")[0]
    if named not in REGISTRY:
        raise ValueError(f"unknown metric {named!r}")
    return REGISTRY[named].higher_is_better


def needs_decisions(metric) -> bool:
    """Whether the metric scores hard decisions (a user metric scores what it is given)."""
    return not is_user(metric) and REGISTRY[base(metric)].needs_decisions


def score(metric, task, y: np.ndarray, pred: np.ndarray, thresholds=None, ids=None) -> float:
    """The metric of predictions `pred` against truth `y` on `task` (see the module doc);
    `thresholds` replace the task's default decisions where the metric takes decisions."""
    y, pred = np.asarray(y), np.asarray(pred)
    if is_user(metric):
        fn = load_user_metric(metric)
        return float(fn(np.arange(len(y)) if ids is None else np.asarray(ids), y, pred))
    if base(metric) not in REGISTRY:
        raise ValueError(f"unknown metric {base(metric)!r}")
    m = REGISTRY[base(metric)]
    if m.needs_decisions:
        truth, hard = task.decisions(y, pred, thresholds)
        return float(m.decisions(truth, hard, task.decision_labels, **_options(metric)))
    if task.predicts not in m.on:
        raise ValueError(f"metric {m.name!r} does not apply to {task.predicts}")
    return float(m.on[task.predicts](y, pred))


@dataclass(frozen=True)
class CV:
    """A cross-validation score: the pooled OOF's, the mean of the folds', and which one is the
    headline (`fold_mean` for rank metrics, else the pooled OOF)."""

    pooled: float
    fold_mean: float
    per_fold: dict
    basis: str  # "mean over folds" or "pooled OOF"

    @property
    def headline(self) -> float:
        return self.fold_mean if self.basis == "mean over folds" else self.pooled

    def text(self, digits: int = 5) -> str:
        other = ("pooled OOF", self.pooled) if self.basis == "mean over folds" else \
            ("mean over folds", self.fold_mean)
        return f"{self.headline:.{digits}f} ({self.basis}; {other[0]} {other[1]:.{digits}f})"


def by_fold_mean(metric) -> bool:
    """Whether the metric's CV is the mean over folds (see Metric.fold_mean)."""
    return not is_user(metric) and REGISTRY[base(metric)].fold_mean


def cv(metric, task, y: np.ndarray, folds: np.ndarray, pred: np.ndarray, thresholds=None,
       ids=None) -> CV:
    """The CV of OOF predictions `pred` (see CV)."""
    per_fold = fold_scores(metric, task, y, folds, pred, thresholds)
    return CV(score(metric, task, y, pred, thresholds, ids), float(np.mean(list(per_fold.values()))),
              per_fold, "mean over folds" if by_fold_mean(metric) else "pooled OOF")


def headline(metric, task, y: np.ndarray, folds: np.ndarray | None, pred: np.ndarray,
             thresholds=None) -> float:
    """Only the CV's headline (what a search optimises): the pooled OOF score, or the mean over
    folds for a rank metric (pooled when there are no folds)."""
    if folds is None or not by_fold_mean(metric):
        return score(metric, task, y, pred, thresholds)
    return float(np.mean(list(fold_scores(metric, task, y, folds, pred, thresholds).values())))


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
