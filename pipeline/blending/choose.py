"""The ensemble's choices, every one made under nested CV, and the scores that describe them.

`choose(rows)` is the whole procedure that decides what is submitted: tune the blend weights
(and the mode, with `mode: tune`) on the rows' OOF; keep them only when they beat equal
weights under CV within those rows (`fallback_to_equal`); then tune the metric's decision
thresholds on that blend, kept only when they beat the defaults under CV within those rows.
The submission is `choose(every OOF row)`. Its honest score is nested: each fold's rows are
blended and decided by `choose(the other folds)`, which never saw that fold's labels, so the
headline is the nested score of exactly what gets submitted (weights + mode + decisions); the
same choice scored on the rows it was tuned on is reported beside it, labelled optimistic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from pipeline.blending import search
from pipeline.blending.blend import Blender, blend, equal_weights
from pipeline.blending.members import Inputs
from pipeline.core import metrics, tasks, thresholds
from pipeline.core.config import EnsembleConfig


@dataclass(frozen=True)
class Rows:
    """OOF rows to choose on: (M, N, K) member predictions, targets, folds."""

    oof: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    task: tasks.Task

    def where(self, mask: np.ndarray) -> Rows:
        return Rows(self.oof[:, mask], self.y[mask], self.folds[mask], self.task)


@dataclass(frozen=True)
class Choice:
    """What is submitted: the blend (weights, mode) and its decisions (thresholds, None for the
    task's defaults), how each was decided, and the search's best, as found."""

    weights: np.ndarray
    mode: str
    weights_choice: str  # tuned, equal, or single (one member: nothing to blend)
    thresholds_kind: str | None  # the kind the metric takes on the task; None: no decisions
    thresholds: object | None  # the tuned ones, or None for the task's defaults
    tuned: search.Tuned | None  # the weight search's best (its score is in-sample)
    weights_cv: tuple[float, float] | None = None  # (tuned, equal) under CV within the rows
    thresholds_cv: tuple[float, float] | None = None  # (tuned, default) under CV within the rows

    def reasons(self, metric) -> str:
        """Why each choice was made, in one line."""
        said = []
        if self.weights_cv is not None:
            tuned, equal = self.weights_cv
            said.append(f"tuned weights {'beat' if self.weights_choice == 'tuned' else 'do not beat'}"
                        f" equal weights under CV ({tuned:.5f} vs {equal:.5f})")
        if self.thresholds_cv is not None:
            tuned, default = self.thresholds_cv
            said.append(f"tuned decision thresholds {'beat' if self.thresholds is not None else 'do not beat'}"
                        f" the defaults under CV ({tuned:.5f} vs {default:.5f})")
        return "; ".join(said) or "nothing was tuned"

    @property
    def thresholds_choice(self) -> str | None:
        if self.thresholds_kind is None:
            return None
        return "default" if self.thresholds is None else "tuned"

    def predictions(self, rows: Rows) -> np.ndarray:
        """The rows' blend (ranked within folds), decided at the chosen thresholds: what a
        submission of these rows would hold, as predictions the metric scores by default."""
        out = blend(rows.oof, self.weights, self.mode, rows.task, rows.folds)
        if self.thresholds is None:
            return out
        return thresholds.decide(self.thresholds_kind, out, self.thresholds, rows.task)


def blend_modes(cfg: EnsembleConfig) -> tuple[str, ...]:
    """The modes to search; with `mode: tune` the first (mean) is also the equal-weight one."""
    if cfg.mode != "tune":
        return (cfg.mode,)
    return tasks.of(cfg.task).blend_modes


def _cv(cfg: EnsembleConfig, rows: Rows, pred: np.ndarray) -> float:
    return metrics.headline(cfg.metric, rows.task, rows.y, rows.folds, pred)


def _held_out_tuned(cfg: EnsembleConfig, rows: Rows, modes: tuple[str, ...], seed: int) -> np.ndarray:
    """Each fold's rows blended with weights tuned on the rows' other folds."""
    out = np.zeros(rows.oof.shape[1:])
    for g in np.unique(rows.folds):
        inner = rows.where(rows.folds != g)
        tuned = search.tune(Blender(inner.oof, rows.task, modes, inner.folds), inner.y, rows.task,
                            cfg.metric, cfg.trials, modes,
                            search.new_study(cfg.metric, seed + int(g) + 1), inner.folds)
        held = rows.folds == g
        out[held] = blend(rows.oof[:, held], tuned.weights, tuned.mode, rows.task, rows.folds[held])
    return out


def choose(cfg: EnsembleConfig, rows: Rows, seed: int,
           study: optuna.Study | None = None) -> Choice:
    """The weights, mode and decision thresholds to submit for `rows`, decided on them alone
    (see the module doc); `study` (default a fresh one seeded by `seed`) holds the search."""
    modes, task, metric = blend_modes(cfg), rows.task, cfg.metric
    m, several_folds = rows.oof.shape[0], len(np.unique(rows.folds)) > 1
    weights, mode, how, tuned, weights_cv = np.ones(1), modes[0], "single", None, None
    if m > 1:
        blender = Blender(rows.oof, task, modes, rows.folds)
        tuned = search.tune(blender, rows.y, task, metric, cfg.trials, modes,
                            study or search.new_study(metric, seed), rows.folds)
        weights, mode, how = tuned.weights, tuned.mode, "tuned"
        if cfg.fallback_to_equal and several_folds:
            weights_cv = (_cv(cfg, rows, _held_out_tuned(cfg, rows, modes, seed)),
                          _cv(cfg, rows, blender(equal_weights(m), modes[0])))
            if not metrics.better(metric, *weights_cv):
                weights, mode, how = equal_weights(m), modes[0], "equal"
    which = task.threshold_kind(metric)
    if which is None:
        return Choice(weights, mode, how, None, None, tuned, weights_cv)
    blended = blend(rows.oof, weights, mode, task, rows.folds)
    fitted = thresholds.fit(which, metric, rows.y, blended, task)
    default = metrics.score(metric, task, rows.y, blended, thresholds.default(which, task))
    if several_folds:  # the thresholds' own CV within the rows
        held_out = thresholds.nested(which, metric, rows.y, blended, rows.folds, task)[0]
    else:
        held_out = metrics.score(metric, task, rows.y, blended, fitted)
    keep = metrics.better(metric, held_out, default)
    return Choice(weights, mode, how, which, fitted if keep else None, tuned, weights_cv,
                  (held_out, default))


@dataclass(frozen=True)
class Nested:
    """The honest score: each fold's rows decided by the choice made without them."""

    choices: dict[int, Choice]
    predictions: np.ndarray  # every held-out fold's decided blend, put together
    cv: metrics.CV


def nested(cfg: EnsembleConfig, rows: Rows) -> Nested:
    choices, out = {}, np.zeros(rows.oof.shape[1:])
    for f in np.unique(rows.folds):
        held = rows.folds == f
        choices[int(f)] = choose(cfg, rows.where(~held), cfg.seed + 1000 * (int(f) + 1))
        out[held] = choices[int(f)].predictions(rows.where(held))
    return Nested(choices, out, metrics.cv(cfg.metric, rows.task, rows.y, rows.folds, out))


def describe(choice: Choice, names: list[str]) -> dict:
    """A choice as weights.json records it."""
    return dict(weights=dict(zip(names, np.asarray(choice.weights).tolist())), mode=choice.mode,
                weights_choice=choice.weights_choice,
                thresholds=thresholds.to_json(choice.thresholds_kind, choice.thresholds),
                thresholds_choice=choice.thresholds_choice)


def evaluate(cfg: EnsembleConfig, data: Inputs, study: optuna.Study) -> dict:
    """Choose what to submit and score it: under nested CV (the headline), in sample
    (optimistic), against equal weights and each single member, overall and per fold; returns
    weights.json's content."""
    metric, task = cfg.metric, data.task
    rows = Rows(data.oof, data.y, data.folds, task)
    choice = choose(cfg, rows, cfg.seed, study)
    in_sample = metrics.cv(metric, task, rows.y, rows.folds, choice.predictions(rows))
    honest = nested(cfg, rows) if cfg.nested_cv else None
    equal = metrics.cv(metric, task, rows.y, rows.folds,
                       blend(rows.oof, equal_weights(len(data.names)), blend_modes(cfg)[0], task,
                             rows.folds))
    single = {n: metrics.cv(metric, task, rows.y, rows.folds, p) for n, p in zip(data.names, rows.oof)}
    per_fold = {n: cv.per_fold for n, cv in single.items()}
    per_fold.update({"equal weights": equal.per_fold, "in-sample": in_sample.per_fold})
    headline, basis = in_sample, "in-sample (nested_cv off: optimistic, unchecked)"
    if honest is not None:
        per_fold["nested CV"] = honest.cv.per_fold
        headline, basis = honest.cv, f"nested CV, {honest.cv.basis}"
    return dict(
        metric=metrics.name(metric), experiments=data.names, **describe(choice, data.names),
        decision=choice.reasons(metric),
        cv=headline.headline, cv_basis=basis, nested_cv=None if honest is None else dict(
            cv=honest.cv.headline, pooled=honest.cv.pooled, fold_mean=honest.cv.fold_mean,
            per_fold=honest.cv.per_fold,
            folds={f: describe(c, data.names) for f, c in honest.choices.items()}),
        in_sample_cv=in_sample.headline, equal_weights_cv=equal.headline,
        single_cv={n: cv.headline for n, cv in single.items()},
        best_single=metrics.best_key(metric, {n: cv.headline for n, cv in single.items()}),
        tuned_in_sample_cv=None if choice.tuned is None else choice.tuned.score,
        per_fold=per_fold, per_column=task.per_column_scores(
            rows.y, blend(rows.oof, choice.weights, choice.mode, task, rows.folds)),
        trials=len(study.trials))
