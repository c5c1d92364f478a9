"""Pure blending logic: simplex weights, blend modes, optuna weight search, nested CV."""
from __future__ import annotations

import numpy as np
import optuna
from scipy.stats import rankdata

from pipeline import metrics

MODES = ("mean", "geometric", "rank")


def simplex_weights(u: np.ndarray) -> np.ndarray:
    """Uniform draws in (0, 1] -> weights uniform on the simplex (Dirichlet(1) via -log u)."""
    e = -np.log(np.clip(u, 1e-12, 1.0))
    return e / e.sum() if e.sum() > 0 else np.full(len(u), 1.0 / len(u))


def blend(probas: np.ndarray, weights: np.ndarray, mode: str) -> np.ndarray:
    """M x N x K model probabilities, M weights -> N x K blended probabilities (rows sum to 1)."""
    w = np.asarray(weights, dtype=np.float64)
    if mode == "mean":
        out = np.tensordot(w, probas, axes=1)
    elif mode == "geometric":
        logp = np.tensordot(w, np.log(np.clip(probas, 1e-15, 1.0)), axes=1)
        out = np.exp(logp - logp.max(axis=1, keepdims=True))
    elif mode == "rank":
        ranks = rankdata(probas, axis=1) / probas.shape[1]
        out = np.tensordot(w, ranks, axes=1)
    else:
        raise ValueError(f"unknown blend mode {mode!r}")
    return out / out.sum(axis=1, keepdims=True)


def equal_weights(m: int) -> np.ndarray:
    return np.full(m, 1.0 / m)


def tune(probas: np.ndarray, y: np.ndarray, metric: str, trials: int, seed: int,
         modes: tuple[str, ...], storage=None, study_name: str | None = None,
         load_if_exists: bool = False):
    """Search simplex weights (and the mode, when several) with seeded TPE.

    Returns (weights, mode, score, study); the weights of every trial are its user attrs.
    """
    m = probas.shape[0]
    direction = "maximize" if metrics.HIGHER_IS_BETTER[metric] else "minimize"
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    study = optuna.create_study(direction=direction, sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=load_if_exists)
    study.enqueue_trial({f"u{i}": float(np.exp(-1.0)) for i in range(m)}
                        | ({"mode": modes[0]} if len(modes) > 1 else {}))

    def objective(trial: optuna.Trial) -> float:
        u = np.array([trial.suggest_float(f"u{i}", 1e-6, 1.0) for i in range(m)])
        mode = trial.suggest_categorical("mode", list(modes)) if len(modes) > 1 else modes[0]
        w = simplex_weights(u)
        trial.set_user_attr("weights", w.tolist())
        trial.set_user_attr("mode", mode)
        return metrics.score(metric, y, blend(probas, w, mode))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = len(study.trials)
    study.optimize(objective, n_trials=max(0, trials - done + (1 if done == 0 else 0)))
    best = study.best_trial
    return np.array(best.user_attrs["weights"]), best.user_attrs["mode"], best.value, study


def nested_cv(probas: np.ndarray, y: np.ndarray, folds: np.ndarray, metric: str, trials: int,
              seed: int, modes: tuple[str, ...]) -> tuple[float, np.ndarray, list[float]]:
    """Tune on k-1 folds' OOF, blend the held-out fold; honest score of the tuned blend.

    Returns (overall held-out score, held-out blended predictions, per-fold scores).
    """
    held_out = np.zeros(probas.shape[1:])
    per_fold = []
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        w, mode, _, _ = tune(probas[:, tr], y[tr], metric, trials, seed + int(f), modes)
        held_out[te] = blend(probas[:, te], w, mode)
        per_fold.append(metrics.score(metric, y[te], held_out[te]))
    return metrics.score(metric, y, held_out), held_out, per_fold
