"""A tuning study's trials: each trains the tuning folds through the train stage's
`train_fold` with the trial's values, in its own folder, reporting the validation score after
every epoch so the pruner can stop it."""
from __future__ import annotations

import sys
from typing import Callable

import optuna
import pandas as pd

from pipeline.core import layout, metrics
from pipeline.core.config import ExperimentConfig, validate_experiment
from pipeline.training.experiment import prepare
from pipeline.training.loop import train_fold
from pipeline.tuning.space import Param, suggest, with_values
from pipeline.tuning.study import (FOLD_STEP, WORKER, Surplus, counted, fail_dead_workers,
                                   tidy, trial_dir, tuning_folds)


def objective(cfg: ExperimentConfig, data: dict, space: list[Param],
              study: optuna.Study) -> Callable[[optuna.Trial], float]:
    """Train the tuning folds with the trial's values; the metric on their held-out rows."""
    folds = tuning_folds(cfg)

    def run_trial(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        if counted(study, below=trial.number) >= cfg.tune.trials:
            raise Surplus()
        values = {p.path: suggest(trial, p) for p in space}
        exp = prepare(validate_experiment(with_values(data, values), f"trial {trial.number}"))
        out, epochs = layout.Run(trial_dir(cfg, trial.number)), []

        def report(position: int, epoch: int, score: float) -> None:
            epochs.append(epoch)
            trial.report(score, position * FOLD_STEP + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch} of fold {folds[position]}: {score:.5f}")

        try:
            frames = []
            for position, fold in enumerate(folds):
                train_fold(exp, fold, out.fold(fold),
                           on_epoch=lambda e, v, p=position: report(p, e, v))
                frames.append(exp.fold_oof(fold, out.best(fold)))
            oof = pd.concat(frames)
            comp = exp.comp
            y = comp.y[pd.Index(comp.train["id"]).get_indexer(oof["id"])]
            return metrics.score(cfg.metric, comp.task, y, oof[list(comp.classes)].to_numpy())
        finally:
            trial.set_user_attr("epochs", len(epochs))
            tidy(out.dir, cfg.tune.keep)

    return run_trial


def work(cfg: ExperimentConfig, data: dict, space: list[Param], study: optuna.Study) -> None:
    """Run trials until the study has `trials` complete or pruned ones (counting those running
    elsewhere); a trial that finds the count already reached is failed as surplus."""
    run_trial = objective(cfg, data, space, study)
    while True:
        for number in fail_dead_workers(study):
            print(f"tune: trial {number}'s worker is gone: failed, parameters queued again",
                  file=sys.stderr)
        if counted(study) >= cfg.tune.trials:
            return
        try:
            study.optimize(run_trial, n_trials=1)
        except Surplus:
            return
