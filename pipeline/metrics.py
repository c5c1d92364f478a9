"""Competition metrics on class-index targets and probability matrices."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, log_loss, roc_auc_score

HIGHER_IS_BETTER = {"accuracy": True, "log_loss": False, "macro_f1": True, "roc_auc": True,
                    "qwk": True}


def score(metric: str, y: np.ndarray, proba: np.ndarray) -> float:
    """`y`: (N,) class indices; `proba`: (N, K) probabilities."""
    k = proba.shape[1]
    pred = proba.argmax(1)
    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    if metric == "log_loss":
        return float(log_loss(y, np.clip(proba, 1e-15, 1), labels=np.arange(k)))
    if metric == "macro_f1":
        return float(f1_score(y, pred, average="macro", labels=np.arange(k), zero_division=0))
    if metric == "roc_auc":
        if k == 2:
            return float(roc_auc_score(y, proba[:, 1]))
        return float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(k)))
    if metric == "qwk":
        return float(cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(k)))
    raise ValueError(f"unknown metric {metric!r}")


def better(metric: str, a: float, b: float) -> bool:
    """Is score `a` better than `b`?"""
    return a > b if HIGHER_IS_BETTER[metric] else a < b


def worst(metric: str) -> float:
    return -np.inf if HIGHER_IS_BETTER[metric] else np.inf
