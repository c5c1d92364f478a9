"""The ensemble's choices, every one made under nested CV, and the scores that describe them.

`choose(rows)` is the whole procedure that decides what is submitted: tune the blend weights
(and the mode, with `mode: tune`) on the rows' OOF, or with `mode: stack` fit a meta-model on
them (its regularisation strength chosen by CV within the rows); keep that blend only when it
beats equal weights under CV within those rows (`fallback_to_equal`); then tune the metric's
decision thresholds on that blend, kept only when they beat the defaults under CV within those
rows. The submission is `choose(every OOF row)`. Its honest score is nested: each fold's rows
are blended and decided by `choose(the other folds)`, which never saw that fold's labels, so
the headline is the nested score of exactly what gets submitted (weights + mode or meta-model
+ decisions); the same choice scored on the rows it was made on is reported beside it,
labelled optimistic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import optuna

from pipeline.blending import search, stack
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
    """What is submitted: the blend (weights and mode, or a stack's meta-model) and its
    decisions (thresholds, None for the task's defaults), how each was decided, and the
    search's best, as found."""

    weights: np.ndarray  # a stack's: each member's share of its coefficients (for reading)
    mode: str
    weights_choice: str  # tuned, stacked, equal, or single (one member: nothing to blend)
    tuned: search.Tuned | None = None  # the weight search's best (its score is in-sample)
    meta: stack.Meta | None = None  # the stack's meta-model (mode stack)
    stack_cv: dict | None = None  # {strength: the stack's CV within the rows}, when stacking
    weights_cv: tuple[float, float] | None = None  # (the blend, equal) under CV within the rows
    thresholds_kind: str | None = None  # the kind the metric takes on the task; None: no decisions
    thresholds: object | None = None  # the tuned ones, or None for the task's defaults
    thresholds_cv: tuple[float, float] | None = None  # (tuned, default) under CV within the rows

    def reasons(self, metric) -> str:
        """Why each choice was made, in one line."""
        said = []
        if self.weights_cv is not None:
            tuned, equal = self.weights_cv
            kept = self.weights_choice != "equal"
            verb = ("beats" if kept else "does not beat") if self.stack_cv is not None else \
                ("beat" if kept else "do not beat")
            what = "the stack" if self.stack_cv is not None else "tuned weights"
            said.append(f"{what} {verb} equal weights under CV ({tuned:.5f} vs {equal:.5f})")
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

    def blended(self, rows: Rows) -> np.ndarray:
        """The rows' blend (ranked within folds) or stack, before decisions."""
        return blend(rows.oof, self.weights, self.mode, rows.task, rows.folds, self.meta)

    def predictions(self, rows: Rows) -> np.ndarray:
        """The rows' blend decided at the chosen thresholds: what a submission of these rows
        would hold, as predictions the metric scores by default."""
        out = self.blended(rows)
        if self.thresholds is None:
            return out
        return thresholds.decide(self.thresholds_kind, out, self.thresholds, rows.task)


def blend_modes(cfg: EnsembleConfig) -> tuple[str, ...]:
    """The weighted modes to search; the first is also the equal-weight blend's (`mode: tune`:
    mean; `mode: stack` searches none and is compared with the equal-weight mean)."""
    if cfg.mode == "stack":
        return ("mean",)
    if cfg.mode != "tune":
        return (cfg.mode,)
    return tasks.of(cfg.task).blend_modes


def _cv(cfg: EnsembleConfig, rows: Rows, pred: np.ndarray) -> float:
    return metrics.headline(cfg.metric, rows.task, rows.y, rows.folds, pred)


def _held_out(rows: Rows, choice_without) -> np.ndarray:
    """Each fold's rows blended by `choice_without(the rows' other folds, fold)`."""
    out = np.zeros(rows.oof.shape[1:])
    for g in np.unique(rows.folds):
        held = rows.folds == g
        out[held] = choice_without(rows.where(~held), int(g)).blended(rows.where(held))
    return out


def _meta(cfg: EnsembleConfig, rows: Rows, seed: int) -> tuple[stack.Meta, dict]:
    """The stack's meta-model for `rows`, its strength chosen by CV within them."""
    return stack.choose(rows.task, cfg.metric, rows.oof, rows.y,
                        stack.inner_groups(rows.folds, seed))


def _kept(cfg: EnsembleConfig, rows: Rows, chosen: Choice, choice_without,
          equal_mode: str) -> Choice:
    """`chosen`, or with `fallback_to_equal` equal weights in `equal_mode` unless `chosen`
    beats them under CV within the rows (each fold blended by `choice_without` it)."""
    if not cfg.fallback_to_equal or len(np.unique(rows.folds)) < 2:
        return chosen
    m = rows.oof.shape[0]
    equal = blend(rows.oof, equal_weights(m), equal_mode, rows.task, rows.folds)
    weights_cv = (_cv(cfg, rows, _held_out(rows, choice_without)), _cv(cfg, rows, equal))
    if metrics.better(cfg.metric, *weights_cv):
        return dataclasses.replace(chosen, weights_cv=weights_cv)
    return dataclasses.replace(chosen, weights=equal_weights(m), mode=equal_mode,
                               weights_choice="equal", meta=None, weights_cv=weights_cv)


def _stacked(cfg: EnsembleConfig, rows: Rows, seed: int) -> Choice:
    """The task's meta-model on the rows (pipeline.blending.stack)."""
    meta, scores = _meta(cfg, rows, seed)

    def stacked_without(inner: Rows, g: int) -> Choice:
        return Choice(np.ones(rows.oof.shape[0]), "stack", "stacked",
                      meta=_meta(cfg, inner, seed + g + 1)[0])

    return _kept(cfg, rows, Choice(stack.member_shares(meta), "stack", "stacked", meta=meta,
                                   stack_cv=scores), stacked_without, blend_modes(cfg)[0])


def _tuned(cfg: EnsembleConfig, rows: Rows, modes: tuple[str, ...], seed: int,
           study: optuna.Study | None = None) -> search.Tuned:
    return search.tune(Blender(rows.oof, rows.task, modes, rows.folds), rows.y, rows.task,
                       cfg.metric, cfg.trials, modes, study or search.new_study(cfg.metric, seed),
                       rows.folds)


def _weighted(cfg: EnsembleConfig, rows: Rows, seed: int, study: optuna.Study | None) -> Choice:
    """Tuned weights (and mode) on the rows; one member: nothing to blend."""
    modes = blend_modes(cfg)
    if rows.oof.shape[0] == 1:
        return Choice(np.ones(1), modes[0], "single")
    tuned = _tuned(cfg, rows, modes, seed, study)

    def tuned_without(inner: Rows, g: int) -> Choice:
        t = _tuned(cfg, inner, modes, seed + g + 1)
        return Choice(t.weights, t.mode, "tuned")

    return _kept(cfg, rows, Choice(tuned.weights, tuned.mode, "tuned", tuned), tuned_without,
                 modes[0])


def choose(cfg: EnsembleConfig, rows: Rows, seed: int,
           study: optuna.Study | None = None) -> Choice:
    """The blend (weights and mode, or a stack) and decision thresholds to submit for `rows`,
    decided on them alone (see the module doc); `study` (default a fresh one seeded by `seed`)
    holds the weight search."""
    task, metric = rows.task, cfg.metric
    chosen = _stacked(cfg, rows, seed) if cfg.mode == "stack" else _weighted(cfg, rows, seed, study)
    which = task.threshold_kind(metric)
    if which is None:
        return chosen
    blended = chosen.blended(rows)
    fitted = thresholds.fit(which, metric, rows.y, blended, task)
    default = metrics.score(metric, task, rows.y, blended, thresholds.default(which, task))
    if len(np.unique(rows.folds)) > 1:  # the thresholds' own CV within the rows
        held_out = thresholds.nested(which, metric, rows.y, blended, rows.folds, task)[0]
    else:
        held_out = metrics.score(metric, task, rows.y, blended, fitted)
    keep = metrics.better(metric, held_out, default)
    return dataclasses.replace(chosen, thresholds_kind=which, thresholds=fitted if keep else None,
                               thresholds_cv=(held_out, default))


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
    """A choice as weights.json records it, a stack's meta-model with its coefficients: what
    submit and the package apply, and for a nested fold, what a learner's fold applies to
    learn from this ensemble (pipeline.training.teacher)."""
    meta = None if choice.meta is None else choice.meta.to_json()
    return dict(weights=dict(zip(names, np.asarray(choice.weights).tolist())), mode=choice.mode,
                weights_choice=choice.weights_choice, stack=meta,
                stack_cv=None if choice.stack_cv is None else
                {f"{s:g}": v for s, v in choice.stack_cv.items()},
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
        per_fold=per_fold, per_column=task.per_column_scores(rows.y, choice.blended(rows)),
        trials=len(study.trials))
