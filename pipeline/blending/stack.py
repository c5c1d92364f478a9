"""Stacking (`mode: stack`): a meta-model fitted on the members' OOF predictions; pure numpy to
apply (what submit and `infer` run), scikit-learn to fit.

The task says how the meta-model reads the members' predictions (`Task.stack_features`: (N, G,
M, P), G independent meta-models, each over M members x P features) and which one it is
(`Task.stack_model`):
- `multinomial` (classes, binary too): logistic regression on every member's log-probability
  of every class, softmax over the classes;
- `logistic` (labels): per label, logistic regression on that label's member logits;
- `ridge` (values): ridge regression on the members' values (fitted on standardised values,
  stored in target units).
Each is linear: scores = features . coef + intercept, coef (G, K, M, P), intercept (G, K),
then its activation (softmax over K, sigmoid, identity). The regularisation strength (the L2
penalty's weight: C = 1 / strength for the logistic models, alpha = strength for ridge) is
chosen from STRENGTHS by CV within the rows the meta-model is fitted on (`choose`), so under
nested CV the held-out fold plays no part in it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline.core import metrics

STRENGTHS = (100.0, 10.0, 1.0, 0.1, 0.01)  # strongest first: ties go to the simpler model
INNER_FOLDS = 3  # rows of a single fold are split this many ways to choose the strength
NEVER = float(np.log(1e-15))  # the score of a class no fitted row has: never predicted
MAX_ITER = 1000


@dataclass(frozen=True)
class Meta:
    """A fitted meta-model: which one (Task.stack_model), its strength and coefficients."""

    model: str
    strength: float
    coef: np.ndarray  # (G, K, M, P)
    intercept: np.ndarray  # (G, K)

    def to_json(self) -> dict:
        return dict(model=self.model, strength=self.strength, coef=self.coef.tolist(),
                    intercept=self.intercept.tolist())


def from_json(d: dict | None) -> Meta | None:
    """A meta-model as weights.json and blend.json hold it (float64 round-trips exactly)."""
    if d is None:
        return None
    return Meta(d["model"], float(d["strength"]), np.asarray(d["coef"], dtype=np.float64),
                np.asarray(d["intercept"], dtype=np.float64))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


ACTIVATIONS = {"multinomial": _softmax, "logistic": expit, "ridge": lambda z: z}


def predict(meta: Meta, probas: np.ndarray, task) -> np.ndarray:
    """The meta-model's (N, K) predictions from the members' (M, N, K). einsum rather than
    BLAS: single-threaded, so the same inputs give the same bytes on any machine."""
    x = task.stack_features(probas)
    scores = np.einsum("ngmp,gkmp->ngk", x, meta.coef) + meta.intercept
    return ACTIVATIONS[meta.model](scores).reshape(len(x), -1)


def _logistic(strength: float) -> LogisticRegression:
    return LogisticRegression(C=1.0 / strength, max_iter=MAX_ITER)


def _multinomial(x: np.ndarray, y: np.ndarray, strength: float, k: int):
    """One softmax over the k classes; a class no row has is never predicted."""
    flat = x[:, 0].reshape(len(x), -1)
    coef, intercept = np.zeros((1, k, flat.shape[1])), np.full((1, k), NEVER)
    present = np.unique(y)
    if len(present) == 1:
        intercept[0, present[0]] = 0.0
    else:
        fitted = _logistic(strength).fit(flat, y)
        c, b = fitted.coef_, fitted.intercept_
        if len(present) == 2:  # one score for the second class against the first: split evenly
            c, b = np.concatenate([-c / 2, c / 2]), np.concatenate([-b / 2, b / 2])
        coef[0, present], intercept[0, present] = c, b
    return coef.reshape(1, k, *x.shape[2:]), intercept


def _per_label(x: np.ndarray, y: np.ndarray, strength: float, k: int):
    """One logistic regression per label; a label with one outcome in the rows predicts its
    smoothed frequency."""
    labels, shape = x.shape[1], x.shape[2:]
    coef, intercept = np.zeros((labels, 1, int(np.prod(shape)))), np.zeros((labels, 1))
    for j in range(labels):
        t = y[:, j].astype(np.int64)
        if t.min() == t.max():
            rate = (t.sum() + 0.5) / (len(t) + 1)
            intercept[j, 0] = np.log(rate / (1 - rate))
        else:
            fitted = _logistic(strength).fit(x[:, j].reshape(len(x), -1), t)
            coef[j, 0], intercept[j, 0] = fitted.coef_[0], fitted.intercept_[0]
    return coef.reshape(labels, 1, *shape), intercept


def _ridge(x: np.ndarray, y: np.ndarray, strength: float, k: int):
    """Ridge regression on the standardised features, its coefficients back in their units."""
    flat = x[:, 0].reshape(len(x), -1)
    mean, scale = flat.mean(0), flat.std(0)
    scale[scale == 0] = 1.0
    fitted = Ridge(alpha=strength).fit((flat - mean) / scale, np.asarray(y, dtype=np.float64))
    w = fitted.coef_ / scale
    return w.reshape(1, 1, *x.shape[2:]), np.array([[fitted.intercept_ - float(np.sum(w * mean))]])


FITTERS = {"multinomial": _multinomial, "logistic": _per_label, "ridge": _ridge}


def fit(task, probas: np.ndarray, y: np.ndarray, strength: float) -> Meta:
    """The task's meta-model fitted on the members' predictions (M, N, K) of targets `y`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        coef, intercept = FITTERS[task.stack_model](task.stack_features(probas), y, strength,
                                                    probas.shape[2])
    return Meta(task.stack_model, float(strength), coef, intercept)


def inner_groups(folds: np.ndarray, seed: int) -> np.ndarray:
    """The groups the strength is chosen over: the rows' folds, or for rows of a single fold a
    split into INNER_FOLDS seeded by `seed`."""
    if len(np.unique(folds)) > 1:
        return folds
    return np.random.default_rng(seed).permutation(len(folds)) % INNER_FOLDS


def cross_fitted(task, probas: np.ndarray, y: np.ndarray, groups: np.ndarray,
                 strength: float) -> np.ndarray:
    """Each group's rows predicted by the meta-model fitted on the other groups."""
    out = np.zeros(probas.shape[1:])
    for g in np.unique(groups):
        held = groups == g
        out[held] = predict(fit(task, probas[:, ~held], y[~held], strength), probas[:, held], task)
    return out


def choose(task, metric, probas: np.ndarray, y: np.ndarray,
           groups: np.ndarray) -> tuple[Meta, dict[float, float]]:
    """The meta-model fitted on every row at the strength whose CV over `groups` scores best
    (the strongest among equals), and {strength: that CV}."""
    scores = {s: metrics.headline(metric, task, y, groups, cross_fitted(task, probas, y, groups, s))
              for s in STRENGTHS}
    return fit(task, probas, y, metrics.best_key(metric, scores)), scores


def member_shares(meta: Meta) -> np.ndarray:
    """Each member's share of the meta-model's absolute coefficients (summing to 1; equal when
    all are zero): what weights.json lists as a stack's member weights, for reading only."""
    mass = np.abs(meta.coef).sum(axis=(0, 1, 3))
    return mass / mass.sum() if mass.sum() > 0 else np.full(len(mass), 1.0 / len(mass))
