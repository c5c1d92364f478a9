"""Competition metrics (scikit-learn's) on class-index targets and probability matrices."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, log_loss, roc_auc_score

HIGHER_IS_BETTER = {"accuracy": True, "log_loss": False, "macro_f1": True, "roc_auc": True,
                    "qwk": True}


def score(metric: str, y: np.ndarray, proba: np.ndarray) -> float:
    """`y`: (N,) class indices; `proba`: (N, K) probabilities, rows summing to 1.

    Label metrics score the argmax. roc_auc: the positive class's column when K = 2, else the
    macro one-vs-rest AUC. qwk: quadratic weighted kappa, classes in their sorted order.
    """
    k = proba.shape[1]
    labels = np.arange(k)
    if metric == "accuracy":
        return float(accuracy_score(y, proba.argmax(1)))
    if metric == "log_loss":
        return float(log_loss(y, np.clip(proba, 1e-15, 1), labels=labels))
    if metric == "macro_f1":
        return float(f1_score(y, proba.argmax(1), average="macro", labels=labels, zero_division=0))
    if metric == "roc_auc":
        if k == 2:
            return float(roc_auc_score(y, proba[:, 1]))
        return float(roc_auc_score(y, proba, multi_class="ovr", labels=labels))
    if metric == "qwk":
        return float(cohen_kappa_score(y, proba.argmax(1), weights="quadratic", labels=labels))
    raise ValueError(f"unknown metric {metric!r}")


def direction(metric: str) -> str:
    """optuna's study direction for the metric."""
    return "maximize" if HIGHER_IS_BETTER[metric] else "minimize"


def better(metric: str, a: float, b: float) -> bool:
    """Is score `a` better than `b`?"""
    return a > b if HIGHER_IS_BETTER[metric] else a < b


def best_key(metric: str, scores: dict) -> str:
    """The key of the best score (the first one among equals)."""
    best = next(iter(scores))
    for key, value in scores.items():
        if better(metric, value, scores[best]):
            best = key
    return best


def worst(metric: str) -> float:
    return -np.inf if HIGHER_IS_BETTER[metric] else np.inf


def fold_scores(metric: str, y: np.ndarray, folds: np.ndarray, proba: np.ndarray) -> dict:
    """{fold: metric on that fold's rows}."""
    return {int(f): score(metric, y[folds == f], proba[folds == f]) for f in np.unique(folds)}
