"""The ensemble's choices and their scores: tuned or equal weights and the blend mode, and the
decision thresholds where the metric needs them; each compared in sample, under nested CV and
against the untuned default."""
from __future__ import annotations

import numpy as np
import optuna

from pipeline.blending import blend, search
from pipeline.blending.members import Inputs
from pipeline.core import metrics, tasks, thresholds
from pipeline.core.config import EnsembleConfig


def decide(cfg: EnsembleConfig, nested: float | None, equal: float) -> tuple[str, str]:
    """(choice, one-line reason): tuned or equal weights, from the nested-CV comparison."""
    if nested is None:
        return "tuned", "Nested CV is off: the tuned weights are not checked against equal ones."
    versus = f"equal weights under nested CV ({nested:.5f} vs {equal:.5f})"
    if metrics.better(cfg.metric, nested, equal):
        return "tuned", f"Tuned weights beat {versus}."
    verdict = f"Tuned weights do not beat {versus}"
    if cfg.fallback_to_equal:
        return "equal", verdict + ": using equal weights."
    return "tuned", verdict + ": keeping them anyway (fallback_to_equal: false)."


def blend_modes(cfg: EnsembleConfig) -> tuple[str, ...]:
    """The modes to search; with `mode: tune` the first (mean) is also the equal-weight one."""
    if cfg.mode != "tune":
        return (cfg.mode,)
    return tasks.of(cfg.task).blend_modes


def evaluate(cfg: EnsembleConfig, data: Inputs, study: optuna.Study) -> dict:
    """Tune, score the comparison (in-sample tuned, nested-CV tuned, equal weights, single
    models, overall and per fold) and choose the weights; returns weights.json's content."""
    metric, y, folds, oof, task = cfg.metric, data.y, data.folds, data.oof, data.task
    modes = blend_modes(cfg)
    tuned = search.tune(oof, y, task, metric, cfg.trials, modes, study, folds)
    eq = blend.equal_weights(len(data.names))
    equal_oof = blend.blend(oof, eq, modes[0], folds)
    equal_cv = metrics.score(metric, task, y, equal_oof)
    nested = search.nested_cv(oof, y, task, folds, metric, cfg.trials, modes, cfg.seed) \
        if cfg.nested_cv else None
    choice, decision = decide(cfg, nested.score if nested else None, equal_cv)
    weights, mode = (tuned.weights, tuned.mode) if choice == "tuned" else (eq, modes[0])

    def named(w: np.ndarray) -> dict:
        return dict(zip(data.names, np.asarray(w).tolist()))

    single = {n: metrics.score(metric, task, y, p) for n, p in zip(data.names, oof)}
    per_fold = {n: metrics.fold_scores(metric, task, y, folds, p) for n, p in zip(data.names, oof)}
    per_fold["equal weights"] = metrics.fold_scores(metric, task, y, folds, equal_oof)
    per_fold["in-sample tuned"] = metrics.fold_scores(
        metric, task, y, folds, blend.blend(oof, tuned.weights, tuned.mode, folds))
    if nested:
        per_fold["nested-CV tuned"] = nested.per_fold
    blended = blend.blend(oof, weights, mode, folds)
    return dict(
        metric=metrics.name(metric), experiments=data.names, choice=choice, decision=decision,
        weights=named(weights), mode=mode, cv=metrics.score(metric, task, y, blended),
        tuned_weights=named(tuned.weights), tuned_mode=tuned.mode,
        tuned_in_sample_cv=tuned.score, nested_cv=nested.score if nested else None,
        equal_weights_cv=equal_cv, single_cv=single, best_single=metrics.best_key(metric, single),
        nested_fold_weights={f: named(w) for f, w in nested.weights.items()} if nested else {},
        nested_fold_modes=nested.modes if nested else {},
        per_fold=per_fold, trials=len(study.trials),
        **decision_thresholds(cfg, data, blended))


def decision_thresholds(cfg: EnsembleConfig, data: Inputs, blended: np.ndarray) -> dict:
    """Thresholds for the metric's decisions on the chosen blend's OOF, where it needs them:
    the default, tuned in sample, and tuned under nested CV (each fold's rows decided by
    thresholds tuned on the other folds). The tuned ones are used only when their nested-CV
    score beats the default's. Plus the per-label or per-grade scores of the blend."""
    task, y, metric = data.task, data.y, cfg.metric
    out = dict(per_column=task.per_column_scores(y, blended))
    which = task.threshold_kind(metric)
    if which is None:
        return dict(out, thresholds=None)
    default = thresholds.default(which, task)
    tuned = thresholds.fit(which, metric, y, blended, task)
    nested, per_fold = thresholds.nested(which, metric, y, blended, data.folds, task)
    default_cv = metrics.score(metric, task, y, blended, default)
    use = tuned if metrics.better(metric, nested, default_cv) else None
    return dict(out, thresholds=thresholds.to_json(which, use), threshold_scores=dict(
        kind=which, default=default_cv, in_sample=metrics.score(metric, task, y, blended, tuned),
        nested=nested, nested_per_fold=per_fold, used="tuned" if use is not None else "default",
        tuned=thresholds.to_json(which, tuned)))
