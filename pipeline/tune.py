"""Stage: tune an experiment's hyperparameters with optuna -> runs/<comp>/<exp>/tune/ and
configs/<comp>/<exp>-tuned.yaml.

The search space is the experiment's `tune` section or `<exp>.tune.yaml` beside it (README,
"Tuning"). Each trial trains the tuning folds through train.train_fold in its own folder,
tune/trial_<n>/, reporting the validation score after every epoch so the pruner can stop it;
its objective is the metric on those folds' held-out rows. Once a trial ends its checkpoints
are deleted (`keep: logs`, the default), or its whole folder (`none`), or nothing (`all`).

The study `<comp>-<exp>` lives in tune/study.db unless `storage` names another database or a
`journal:<file>`; every worker started on it (`make tune` again, on this or another machine)
takes the next trials until `trials` trials are complete or pruned. A killed worker's trial is
marked failed and its parameters queued again: at once by any worker on the same host, through
the storage's heartbeat (databases) by workers elsewhere. Each worker, when it stops, writes
from the best trial so far: best.json, report.md with its plots, and the tuned config (only
when its content changed, so make does not retrain it for nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
import sqlalchemy.exc
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pipeline import metrics, train
from pipeline.artifacts import write_json, write_text
from pipeline.config import (ExperimentConfig, apply_overrides, config_hash, experiment_data,
                             experiment_overrides, read_yaml, validate_experiment)
from pipeline.errors import UserError, cli, stage_args
from pipeline.models import check_pretrained
from pipeline.search_space import Param, parse_space, set_value, split_path, suggest, with_values
from pipeline.tune_report import write_report

FOLD_STEP = 1000  # reported step = tuning-fold position * FOLD_STEP + epoch
HEARTBEAT_S, GRACE_S = 30, 120  # a database trial without a heartbeat for GRACE_S has failed
CHECKPOINTS = ("*.safetensors", "last.pt")
WORKER = f"{socket.gethostname()}:{os.getpid()}"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class Surplus(Exception):
    """This trial would exceed `trials`: other workers already run or finished enough."""


def study_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "tune"


def study_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.experiment}"


def storage_url(cfg: ExperimentConfig) -> str:
    return cfg.tune.storage or f"sqlite:///{study_dir(cfg) / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """`journal:<file>`: optuna's journal file; anything else: a database URL, with heartbeats
    so a killed worker's trial is failed and retried by the others."""
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url)
    except (ValueError, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise UserError(f"tune.storage: optuna cannot open {url!r} "
                        f"({str(err).splitlines()[0]})") from None


def _rdb_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The database storage; when workers start together one creates the tables while the
    others may see them half made ("already exists", a duplicate schema version): those try
    again a moment later."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}

    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=None))

    for attempt in range(attempts - 1):
        try:
            return connect()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            time.sleep(1 + attempt)
    return connect()


class TrialSeeded(optuna.samplers.BaseSampler):
    """A sampler made afresh for every trial, seeded by (seed, trial number): one worker's
    study repeats exactly, and workers sharing a study never draw from the same stream."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self.current = make(seed)

    def before_trial(self, study, trial) -> None:
        self.current = self.make(self.seed * 1_000_003 + trial.number)
        self.current.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.current.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.current.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.current.after_trial(study, trial, state, values)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "random":
        return TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return TrialSeeded(lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True), seed)


def make_pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    tc = cfg.tune
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials,
                                           n_warmup_steps=tc.min_epochs - 1)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=tc.min_epochs)
    return optuna.pruners.NopPruner()


def tuning_folds(cfg: ExperimentConfig) -> list[int]:
    n = cfg.folds.n_splits
    folds = list(range(n)) if cfg.tune.folds == "all" else sorted(set(cfg.tune.folds))
    if not set(folds) <= set(range(n)):
        raise UserError(f"tune.folds: {cfg.tune.folds}: the folds are 0 to {n - 1}")
    return folds


def open_study(cfg: ExperimentConfig) -> optuna.Study:
    """The study `<comp>-<exp>` in the storage; refused when its trials searched another space,
    metric, folds or base config."""
    url = storage_url(cfg)
    setup = dict(metric=metrics.name(cfg.metric), folds=tuning_folds(cfg), tag=config_hash(cfg),
                 space=cfg.tune.model_dump(mode="json")["space"])
    study = optuna.create_study(storage=open_storage(url), study_name=study_name(cfg),
                                direction=metrics.direction(cfg.metric), load_if_exists=True,
                                sampler=make_sampler(cfg.tune.sampler, cfg.seed),
                                pruner=make_pruner(cfg))
    found = {k: study.user_attrs.get(k) for k in setup}
    if study.trials and found != setup:
        changed = ", ".join(k for k in setup if found[k] != setup[k])
        raise UserError(f"tune.storage: study {study.study_name!r} in {url} was run with other "
                        f"settings ({changed}); set another tune.storage or remove the study")
    for key, value in setup.items():
        study.set_user_attr(key, value)
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def fail_dead_workers(study: optuna.Study) -> list[int]:
    """Mark failed the running trials of workers on this host that no longer exist, and queue
    their parameters again; returns their numbers. A trial another worker failed meanwhile is
    left to that worker."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            failed.append(t.number)
    return failed


def counted(study: optuna.Study, below: int | None = None) -> int:
    """Trials complete, pruned or running (numbered below `below`, when given)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=DONE + (TrialState.RUNNING,))
               if below is None or t.number < below)


def tidy(trial_dir: Path, keep: str) -> None:
    """What a finished trial's folder keeps: everything, its logs only, or nothing."""
    if keep == "none":
        shutil.rmtree(trial_dir, ignore_errors=True)
    elif keep == "logs":
        for pattern in CHECKPOINTS:
            for path in trial_dir.rglob(pattern):
                path.unlink()


def trial_dir(cfg: ExperimentConfig, number: int) -> Path:
    return study_dir(cfg) / f"trial_{number:04d}"


def objective(cfg: ExperimentConfig, data: dict, space: list[Param],
              study: optuna.Study) -> Callable[[optuna.Trial], float]:
    """Train the tuning folds with the trial's values; the metric on their held-out rows."""
    folds = tuning_folds(cfg)

    def run_trial(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        if counted(study, below=trial.number) >= cfg.tune.trials:
            raise Surplus()
        values = {p.path: suggest(trial, p) for p in space}
        s = train.prepare(validate_experiment(with_values(data, values), f"trial {trial.number}"))
        out, epochs = trial_dir(cfg, trial.number), []

        def report(position: int, epoch: int, score: float) -> None:
            epochs.append(epoch)
            trial.report(score, position * FOLD_STEP + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch} of fold {folds[position]}: {score:.5f}")

        try:
            frames = []
            for position, fold in enumerate(folds):
                train.train_fold(s, fold, out / f"fold{fold}",
                                 on_epoch=lambda e, v, p=position: report(p, e, v))
                frames.append(train.fold_oof(s, fold, out / f"fold{fold}"))
            oof = pd.concat(frames)
            y = s.labels[pd.Index(s.comp.train["id"]).get_indexer(oof["id"])]
            return metrics.score(cfg.metric, y, oof[list(s.comp.classes)].to_numpy())
        finally:
            trial.set_user_attr("epochs", len(epochs))
            tidy(out, cfg.tune.keep)

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


def tuned_yaml(path: Path, data: dict, params: dict[str, Any], note: str,
               overrides: list[str] | None = None) -> str:
    """Experiment file `path` with the `overrides` the trials trained with and the tuned values
    set, its `tune` section and experiment name dropped (the new file's name names it), under
    a comment `note`."""
    own = apply_overrides(read_yaml(path), [o for o in experiment_overrides(overrides)
                                             if not o.startswith(("tune.", "tune="))])
    own.pop("tune", None)
    own.pop("experiment", None)
    for key, value in params.items():
        own = set_value(own, split_path(key), value, source=data)
    body = yaml.safe_dump(own, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" for line in note.splitlines()) + body


def tuned_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-tuned.yaml")


def results(cfg: ExperimentConfig, path: Path, data: dict, study: optuna.Study,
            overrides: list[str] | None = None) -> dict | None:
    """best.json, report.md and plots, and the tuned config; None when no trial completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("tune: no trial completed yet", file=sys.stderr)
        return None
    best = study.best_trial
    url, folds = storage_url(cfg), tuning_folds(cfg)
    note = (f"Tuned by `make tune` from {path.name}: study {study.study_name!r} in {url},\n"
            f"best trial {best.number}: {metrics.name(cfg.metric)} {best.value:.5f} on folds {folds} "
            f"(optimistic: chosen on those folds).")
    text = tuned_yaml(path, data, best.params, note, overrides)
    target = tuned_path(path)
    if not target.is_file() or target.read_text() != text:
        write_text(text, target)
    summary = dict(study=study.study_name, storage=url, metric=metrics.name(cfg.metric), folds=folds,
                   best_trial=best.number, best_value=best.value, best_params=best.params,
                   tuned_config=str(target),
                   trials={s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                           for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                     TrialState.RUNNING)})
    write_json(summary, study_dir(cfg) / "best.json")
    write_report(study, cfg, summary, study_dir(cfg), cv_scores(cfg, target), FOLD_STEP)
    return summary


def cv_scores(cfg: ExperimentConfig, target: Path) -> dict[str, float | None]:
    """Full-CV scores of the untuned and the tuned experiment, where trained."""
    out = {}
    for label, name in (("untuned", cfg.experiment), ("tuned", target.stem)):
        scores = cfg.run_dir.parent / name / "scores.json"
        out[label] = json.loads(scores.read_text())["cv"] if scores.is_file() else None
    return out


def run(path: str | Path, overrides: list[str] | None = None) -> dict | None:
    path = Path(path)
    data = experiment_data(path, overrides)
    cfg = validate_experiment(data, path)
    if cfg.tune is None:
        raise UserError(f"{path}: no search space: add a `tune:` section or "
                        f"{path.stem}.tune.yaml beside it (README, Tuning)")
    try:
        space = parse_space(data)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    check_pretrained(cfg.model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg)
    work(cfg, data, space, study)
    summary = results(cfg, path, data, study, overrides)
    if summary:
        print(f"tune: best {metrics.name(cfg.metric)} {summary['best_value']:.5f} (trial "
              f"{summary['best_trial']}; {summary['trials']}) -> {summary['tuned_config']}, "
              f"report {study_dir(cfg) / 'report.md'}", file=sys.stderr)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml")
    run(args.config, args.overrides)


if __name__ == "__main__":
    main()
