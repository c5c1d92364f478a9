"""Pure blending logic: simplex weights, blend modes, seeded optuna weight search, nested CV.

Arrays are (models, rows, columns): class probabilities (rows summing to 1), label
probabilities, or values (one column); only the first are renormalised per row. Everything is vectorised: each mode's per-model transform
(log-probabilities, rank quantiles) is computed once, so an optuna trial costs one tensordot
and one metric call, never a Python loop over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna
from scipy.stats import rankdata

from pipeline import metrics

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


def is_simplex(probas: np.ndarray) -> bool:
    """Whether predictions are class probabilities: several columns, every row summing to 1."""
    return probas.shape[-1] > 1 and bool(np.allclose(probas.sum(-1), 1.0))


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


def blend(probas: np.ndarray, weights: np.ndarray, mode: str,
          folds: np.ndarray | None = None) -> np.ndarray:
    """(M, N, K) probabilities and M weights -> (N, K) blended probabilities (see `transform`
    for `folds`)."""
    return combine(transform(probas, mode, folds), weights, mode, is_simplex(probas))


def blend_by_fold(probas: np.ndarray, folds: np.ndarray, weights: dict, modes: dict) -> np.ndarray:
    """Blend each fold's rows with that fold's own weights and mode (nested CV's held-out
    blends)."""
    out = np.zeros(probas.shape[1:])
    for f in np.unique(folds):
        rows = folds == f
        out[rows] = blend(probas[:, rows], weights[f], modes[f])
    return out


def new_study(metric: str, seed: int | None, storage=None, study_name: str | None = None):
    """A study in the metric's direction, sampled by multivariate TPE seeded with `seed`.

    With a shared `storage` several workers may tune the same study at once; pass seed=None
    there so that the workers do not propose the same trials.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.create_study(direction=metrics.direction(metric), sampler=sampler,
                               storage=storage, study_name=study_name, load_if_exists=True)


@dataclass
class Tuned:
    weights: np.ndarray
    mode: str
    score: float


def tune(probas: np.ndarray, y: np.ndarray, metric: str, trials: int, modes: tuple[str, ...],
         study: optuna.Study, folds: np.ndarray | None = None) -> Tuned:
    """Search simplex weights (and the mode, as a categorical, when several) to optimise
    `metric` on the blend of `probas` (rank mode ranking within `folds`, when given), until
    `study` holds `trials` complete trials.

    The first trial is equal weights. Each trial stores its actual weights and mode as user
    attributes. Trials already in the study count, so a rerun on a finished study samples
    nothing and several workers sharing one study stop together at `trials`.
    """
    m = probas.shape[0]
    transformed = {mode: transform(probas, mode, folds) for mode in modes}
    simplex = is_simplex(probas)

    def objective(trial: optuna.Trial) -> float:
        u = np.array([trial.suggest_float(f"u{i}", U_LOW, 1.0) for i in range(m)])
        mode = trial.suggest_categorical("mode", list(modes)) if len(modes) > 1 else modes[0]
        w = simplex_weights(u)
        trial.set_user_attr("weights", w.tolist())
        trial.set_user_attr("mode", mode)
        return metrics.score(metric, y, combine(transformed[mode], w, mode, simplex))

    equal = {f"u{i}": float(np.exp(-1.0)) for i in range(m)}
    study.enqueue_trial(equal | ({"mode": modes[0]} if len(modes) > 1 else {}),
                        skip_if_exists=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    remaining = trials - len(complete)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining,
                       callbacks=[optuna.study.MaxTrialsCallback(trials)])
    best = study.best_trial
    return Tuned(np.array(best.user_attrs["weights"]), best.user_attrs["mode"], best.value)


@dataclass
class Nested:
    score: float  # the metric on every held-out fold's blend, put together
    per_fold: dict  # {fold: score of its held-out blend}
    weights: dict  # {fold: weights tuned without that fold}
    modes: dict  # {fold: mode tuned without that fold}
    held_out: np.ndarray  # (N, K) the held-out blends


def nested_cv(probas: np.ndarray, y: np.ndarray, folds: np.ndarray, metric: str, trials: int,
              modes: tuple[str, ...], seed: int) -> Nested:
    """The tuned blend's honest score: for each fold, tune on the other folds' OOF (a fresh
    in-memory study seeded with seed + fold) and blend the held-out fold with those weights."""
    weights, chosen = {}, {}
    for f in np.unique(folds):
        rows = folds != f
        tuned = tune(probas[:, rows], y[rows], metric, trials, modes,
                     new_study(metric, seed + int(f)), folds[rows])
        weights[int(f)], chosen[int(f)] = tuned.weights, tuned.mode
    held_out = blend_by_fold(probas, folds, weights, chosen)
    return Nested(metrics.score(metric, y, held_out), metrics.fold_scores(metric, y, folds, held_out),
                  weights, chosen, held_out)
