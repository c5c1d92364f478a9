"""The tuning stage's work (`make tune`; stage docstring: pipeline.tune): a worker's loop over
the study's trials, then what it found."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from pipeline.core.config import (ExperimentConfig, experiment_data, read_yaml, tune_file,
                                  validate_experiment)
from pipeline.core.errors import UserError
from pipeline.models.pretrained import check_pretrained
from pipeline.tuning.results import results
from pipeline.tuning.space import Param, SpaceError, base_values, parse_space
from pipeline.tuning.steps import steps_per_fold
from pipeline.tuning.study import counted, open_study, study_dir
from pipeline.tuning.trials import objective, score_line
from pipeline.tuning.workers import (GRACE_S, claim, fresh, heartbeat, requeue, retry_dead,
                                     study_lock)


def space_file(path: Path, key: str) -> Path:
    """The file search-space key `key` comes from: `<exp>.tune.yaml` when it sets it, else
    the experiment file."""
    tune = tune_file(path)
    return tune if tune.is_file() and key in ((read_yaml(tune) or {}).get("space") or {}) else path


def tune_experiment(path: str | Path, overrides: list[str] | None = None) -> dict | None:
    """Work on the experiment's study until it holds `tune.trials` trials, then write what it
    found; returns best.json's content (None when no trial completed)."""
    path = Path(path)
    data = experiment_data(path, overrides)
    cfg = validate_experiment(data, path)
    if cfg.tune is None:
        raise UserError(f"{path}: no search space: add a `tune:` section or "
                        f"{path.stem}.tune.yaml beside it (README, Tuning)")
    try:
        space = parse_space(data)
    except SpaceError as err:
        raise UserError(f"{space_file(path, err.key)}: {err}") from None
    check_pretrained(cfg.model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    per_fold = steps_per_fold(data, space)
    study = open_study(cfg, per_fold)
    work(cfg, data, space, study, per_fold)
    summary = results(cfg, path, data, study, overrides)
    if summary:
        print(f"tune: {summary['verdict']}; report {study_dir(cfg) / 'report.md'}",
              file=sys.stderr)
    return summary


def work(cfg: ExperimentConfig, data: dict, space: list[Param], study: optuna.Study,
         per_fold: int) -> None:
    """Run trials until the study has `trials` complete or pruned ones, counting those running
    elsewhere; a new study's first trial is the base config (the experiment as written)."""
    run_trial = objective(cfg, data, space, per_fold)
    with study_lock(cfg):
        if not study.trials:
            study.enqueue_trial(base_values(data, space), user_attrs={"base": True})
    while True:
        for number in retry_dead(cfg, study):
            print(f"tune: trial {number}'s worker is gone: failed, its parameters queued again",
                  file=sys.stderr)
        if counted(study) >= cfg.tune.trials:
            return
        trial = study.ask()
        if not claim(cfg, study, trial):
            continue  # another worker popped the same queued trial and runs it
        if counted(study, below=trial.number) >= cfg.tune.trials:
            study.tell(trial, state=TrialState.FAIL)  # surplus: others run or ran enough
            return
        run_claimed(cfg, study, trial, run_trial)


def run_claimed(cfg: ExperimentConfig, study: optuna.Study, trial: optuna.Trial,
                run_trial: Callable[[optuna.Trial], float]) -> None:
    """Run this worker's trial under its heartbeat and tell the study how it ended. Ctrl-C
    fails it, queues its parameters again and stops the worker (exit 130)."""
    try:
        with heartbeat(trial):
            score = run_trial(trial)
    except optuna.TrialPruned as why:
        state, line = TrialState.PRUNED, f"tune: trial {trial.number}: pruned {why}"
    except KeyboardInterrupt:
        requeue(cfg, study, trial.number)
        raise KeyboardInterrupt(f"trial {trial.number} failed and its parameters are queued "
                                f"again; make tune resumes the study") from None
    except Exception as err:
        study.tell(trial, state=TrialState.FAIL)
        print(f"tune: trial {trial.number}: failed ({type(err).__name__})", file=sys.stderr)
        raise
    else:
        state = TrialState.COMPLETE if math.isfinite(score) else TrialState.FAIL
        line = score_line(fresh(study, trial.number), cfg.metric, score)
    try:
        study.tell(trial, score if state == TrialState.COMPLETE else None, state=state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        if not fresh(study, trial.number).state.is_finished():
            raise
        line = (f"tune: trial {trial.number}: another worker failed it meanwhile (its heartbeat "
                f"was {GRACE_S} s old): result dropped")
    print(line, file=sys.stderr)
