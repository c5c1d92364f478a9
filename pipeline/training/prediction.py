"""An experiment's TTA predictions (`make predict`): every fold model on its OOF rows with each
candidate view set, the best kept, and on the test set with the chosen views, averaged over
folds (what `infer` computes from a package)."""
from __future__ import annotations

import sys

from pipeline.core import metrics
from pipeline.core.artifacts import write_csv, write_json
from pipeline.core.config import ExperimentConfig
from pipeline.reports import experiment as experiment_report
from pipeline.training.experiment import prepare


def predict_experiment(cfg: ExperimentConfig) -> dict:
    """Predict the trained experiment's OOF rows with every candidate view set, keep the best,
    write oof_tta.csv, scores.json's TTA figures, the report and test.csv; returns the scores."""
    exp = prepare(cfg)
    scores = exp.trained_scores()
    comp, run_dir = exp.comp, exp.run
    candidates = list(dict.fromkeys(cfg.tta.candidates if cfg.tta.views == "auto"
                                    else [cfg.tta.views]))
    oof = exp.predict_oof(candidates)
    tta_scores = {v: metrics.score(cfg.metric, comp.task, comp.y, oof[v]) for v in candidates}
    best = metrics.best_key(cfg.metric, tta_scores)  # ties: the first listed (the cheaper)
    per_fold_tta = metrics.fold_scores(cfg.metric, comp.task, comp.y, exp.folds, oof[best])
    write_csv(exp.frame(comp.train["id"], exp.folds, oof[best]), run_dir.oof_tta)
    scores.update(cv_tta=tta_scores[best], per_fold_tta=per_fold_tta, tta_views=best,
                  task=cfg.task, tta_merge=cfg.tta.merge, tta_scores=tta_scores)
    write_json(scores, run_dir.scores)
    experiment_report.write(exp)  # report.md and PNGs: learning curves, OOF errors
    test = exp.predict_test([best])[best]  # the chosen views only, as a package predicts
    write_csv(exp.frame(comp.test["id"], -1, test).drop(columns="fold"), run_dir.test)  # last: make's target
    print(f"{cfg.experiment}: CV {scores['metric']} {scores['cv']:.5f} without TTA, "
          f"{tta_scores[best]:.5f} with {best} ({cfg.tta.merge})", file=sys.stderr)
    return scores
