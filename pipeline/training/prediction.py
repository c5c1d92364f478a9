"""An experiment's TTA predictions (`make predict`): every fold model on its OOF rows with each
candidate view set, and on the test set with the view set chosen, averaged over folds (what
`infer` computes from a package).

With `tta.views: auto` the view set is a choice made by looking at OOF rows, so it is made
under nested CV: each fold's rows get the view set chosen on the other folds (oof_tta.csv, and
the honest `cv_tta`); the test set gets the one chosen on every fold, whose own OOF score is
kept as `cv_tta_in_sample` (optimistic).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from pipeline.core import metrics
from pipeline.core.artifacts import write_csv, write_json
from pipeline.core.config import ExperimentConfig
from pipeline.models import tta
from pipeline.reports import experiment as experiment_report
from pipeline.training.experiment import prepare


@dataclass(frozen=True)
class ViewChoice:
    chosen: str  # on every fold: what the test set gets
    per_fold: dict[int, str]  # fold -> chosen on the other folds
    oof: np.ndarray  # each fold's rows with its own choice
    in_sample: dict[str, float]  # every candidate's CV on all folds (optimistic for the best)


def choose_view_set(metric, task, y: np.ndarray, folds: np.ndarray,
                    oof: dict[str, np.ndarray]) -> ViewChoice:
    """The view set with the best CV, chosen on all folds and, for each fold, on the others;
    ties go to the one listed first (the cheaper, by convention)."""
    def best(rows: np.ndarray) -> tuple[str, dict]:
        scores = {v: metrics.cv(metric, task, y[rows], folds[rows], p[rows]).headline
                  for v, p in oof.items()}
        return metrics.best_key(metric, scores), scores

    chosen, in_sample = best(np.ones(len(y), dtype=bool))
    per_fold, nested = {}, np.zeros_like(next(iter(oof.values())))
    for f in np.unique(folds):
        held_out = folds == f
        per_fold[int(f)] = best(~held_out)[0] if len(oof) > 1 else chosen
        nested[held_out] = oof[per_fold[int(f)]][held_out]
    return ViewChoice(chosen, per_fold, nested, in_sample)


def distinct_view_sets(names: list[str], side: int, size: int) -> tuple[list[str], dict[str, str]]:
    """The view sets that differ when crops of `size` are cut from images of `side` (at
    crop_pct 1 every crop is the whole image: five_crop is no TTA, ten_crop is hflip), and
    {set left out: the earlier, cheaper set it equals}."""
    kept, same, seen = [], {}, {}
    for name in names:
        views = frozenset(tta.geometry(v, side, size) for v in tta.VIEW_SETS[name])
        if views in seen:
            same[name] = seen[views]
        else:
            seen[views] = name
            kept.append(name)
    return kept, same


def candidate_view_sets(cfg: ExperimentConfig, side: int) -> list[str]:
    """The view sets to predict: `tta.candidates` (auto) or `tta.views`, less those that equal a
    cheaper one at this crop (said in one line)."""
    asked = list(dict.fromkeys(cfg.tta.candidates if cfg.tta.views == "auto" else [cfg.tta.views]))
    order = list(dict.fromkeys(list(tta.VIEW_SETS) + asked))  # the cheaper sets first
    _, same = distinct_view_sets(order, side, cfg.image_size)
    left = list(dict.fromkeys(same.get(v, v) for v in asked))
    for v in asked:
        if v in same:
            print(f"note: {cfg.experiment}: tta view set {v} equals {same[v]} here (crops of "
                  f"{cfg.image_size} px from {side} px images); predicting {same[v]} instead",
                  file=sys.stderr)
    return left


def predict_experiment(cfg: ExperimentConfig) -> dict:
    """Predict the trained experiment's OOF rows with every candidate view set, choose under
    nested CV, write oof_tta.csv, scores.json's TTA figures, the report and test.csv; returns
    the scores."""
    exp = prepare(cfg)
    scores = exp.trained_scores()
    comp, run = exp.comp, exp.run
    candidates = candidate_view_sets(cfg, exp.side)
    views = choose_view_set(cfg.metric, comp.task, comp.y, exp.folds, exp.predict_oof(candidates))
    honest = metrics.cv(cfg.metric, comp.task, comp.y, exp.folds, views.oof)
    write_csv(exp.frame(comp.train["id"], exp.folds, views.oof), run.oof_tta)
    scores.update(cv_tta=honest.headline, cv_tta_pooled=honest.pooled,
                  cv_tta_fold_mean=honest.fold_mean, per_fold_tta=honest.per_fold,
                  tta_views=views.chosen, tta_views_per_fold=views.per_fold,
                  cv_tta_in_sample=views.in_sample[views.chosen], tta_scores=views.in_sample,
                  task=cfg.task, tta_merge=cfg.tta.merge)
    write_json(scores, run.scores)
    experiment_report.write(exp)  # report.md and PNGs: learning curves, OOF errors
    test = exp.predict_test([views.chosen])[views.chosen]  # the chosen views only, as a package
    write_csv(exp.frame(comp.test["id"], -1, test).drop(columns="fold"), run.test)  # last: make's
    nested = "" if len(candidates) == 1 else \
        f" (views chosen under nested CV; {views.chosen} on all folds: {views.in_sample[views.chosen]:.5f}, optimistic)"
    print(f"{cfg.experiment}: CV {scores['metric']} {scores['cv']:.5f} without TTA, "
          f"{honest.text()} with TTA {views.chosen}{nested} ({cfg.tta.merge})", file=sys.stderr)
    return scores
