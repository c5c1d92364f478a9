"""Blends: simplex weights and the weighted blend modes (mean, geometric, rank), pure numpy;
`blend` also applies a stack's meta-model (pipeline.blending.stack) where one was chosen.

Arrays are (models, rows, columns): class probabilities (rows summing to 1), label
probabilities, or values (one column); only the first are renormalised per row. Everything is
vectorised: each mode's per-model transform (log-probabilities, rank quantiles) is computed
once, so a weight-search trial (pipeline.blending.search) costs one tensordot and one metric
call, never a Python loop over rows.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from pipeline.blending import stack

MODES = ("mean", "geometric", "rank")
U_LOW = 1e-6  # u in [U_LOW, 1]: -log(u) spans [0, 13.8], so any weight ratio is reachable
EPS = 1e-15


def simplex_weights(u: np.ndarray) -> np.ndarray:
    """Draws in (0, 1] -> simplex weights: -log(u), normalised.

    Uniform u gives Exponential(1) draws, whose normalisation is Dirichlet(1, ..., 1): the
    uniform distribution on the simplex, so the search prior covers it evenly; u = 1 gives an
    exact zero weight.
    """
    e = -np.log(np.clip(np.asarray(u, dtype=np.float64), EPS, 1.0))
    total = e.sum()
    return e / total if total > 0 else equal_weights(len(e))


def equal_weights(m: int) -> np.ndarray:
    return np.full(m, 1.0 / m)


def transform(probas: np.ndarray, mode: str, folds: np.ndarray | None = None) -> np.ndarray:
    """What a mode averages: probabilities, log-probabilities, or rank quantiles.

    Rank quantiles rank each model's class column over the rows (ties share their mean rank),
    divided by the row count. With `folds`, each fold's rows are ranked on their own, as the
    test set is at prediction time, so OOF scores of rank blends measure what the test gets.
    """
    if mode == "mean":
        return probas
    if mode == "geometric":
        return np.log(np.clip(probas, EPS, 1.0))
    if mode != "rank":
        raise ValueError(f"unknown blend mode {mode!r}; expected one of {MODES}")
    if folds is None:
        return rankdata(probas, axis=1) / probas.shape[1]
    out = np.empty_like(probas, dtype=np.float64)
    for f in np.unique(folds):
        rows = folds == f
        out[:, rows] = transform(probas[:, rows], mode)
    return out


def combine(transformed: np.ndarray, weights: np.ndarray, mode: str,
            simplex: bool = True) -> np.ndarray:
    """Weighted mean over models of `transform(probas, mode)` -> rows that sum to 1 (class
    probabilities; other predictions are not renormalised).

    Geometric: exp of the mean log-probability, renormalised (the log-probabilities lie in
    [log EPS, 0] and the weights sum to 1, so exp cannot overflow or underflow). Rank: mean rank
    quantile, renormalised per row (argmax is kept; it is what a probability submission holds).
    einsum rather than BLAS: single-threaded, so it neither spins threads on a busy machine nor
    depends on their number.
    """
    out = np.einsum("m,mnk->nk", np.asarray(weights, dtype=np.float64), transformed)
    if mode == "geometric":
        out = np.exp(out)
    return out / out.sum(axis=1, keepdims=True) if simplex else out


def in_units(quantiles: np.ndarray, values: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Blended rank quantiles (N, 1) mapped back to target units through the distribution of
    blended values (N, 1), within each group of rows ranked together: the rank r of n maps to
    the r-th smallest value, so a lone model's rank blend is its own values."""
    out = np.empty_like(quantiles)
    for g in [None] if groups is None else np.unique(groups):
        rows = slice(None) if g is None else groups == g
        q, v = quantiles[rows, 0], values[rows, 0]
        n = len(q)
        position = np.clip((q * n - 1) / max(n - 1, 1), 0.0, 1.0)
        out[rows, 0] = np.quantile(v, position) if n > 1 else v
    return out


class Blender:
    """Members' predictions (M, N, K) ready to blend on `task`: each mode's transform is made
    once, so a weight-search trial costs one einsum (and one quantile map for a rank blend of
    values, which returns to target units). With `folds`, each fold's rows are ranked on their
    own, as the test set is at prediction time."""

    def __init__(self, probas: np.ndarray, task, modes: tuple[str, ...],
                 folds: np.ndarray | None = None):
        self.probas, self.folds, self.simplex = probas, folds, task.simplex
        self.values = task.predicts == "values"
        self.transformed = {mode: transform(probas, mode, folds) for mode in modes}

    def __call__(self, weights: np.ndarray, mode: str) -> np.ndarray:
        out = combine(self.transformed[mode], weights, mode, self.simplex)
        if mode == "rank" and self.values:
            return in_units(out, combine(self.probas, weights, "mean", False), self.folds)
        return out


def blend(probas: np.ndarray, weights: np.ndarray, mode: str, task,
          folds: np.ndarray | None = None, meta: stack.Meta | None = None) -> np.ndarray:
    """(M, N, K) predictions and M weights -> (N, K) blended predictions on `task` (see
    Blender); with a stack's `meta`-model (mode `stack`), its predictions instead."""
    if meta is not None:
        return stack.predict(meta, probas, task)
    return Blender(probas, task, (mode,), folds)(weights, mode)
