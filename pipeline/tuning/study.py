"""An experiment's tuning study (`make tune`): its storage (SQLite in the run folder, another
database, or a journal file), samplers seeded per trial, pruners, the trial count and the
trial folders (pipeline.tuning.workers keeps several workers on it in step)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pipeline.core import layout, metrics
from pipeline.core.config import ExperimentConfig, config_hash
from pipeline.core.errors import UserError
from pipeline.tuning.steps import PerFold

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def study_dir(cfg: ExperimentConfig) -> Path:
    return layout.Run.of(cfg.name, cfg.experiment).tune


def study_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.experiment}"


def storage_url(cfg: ExperimentConfig) -> str:
    return cfg.tune.storage or f"sqlite:///{study_dir(cfg) / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """`journal:<file>`: optuna's journal file; anything else: a database URL."""
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

    for attempt in range(attempts - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            time.sleep(1 + attempt)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


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


def make_sampler(sampler: str, seed: int) -> optuna.samplers.BaseSampler:
    if sampler == "random":
        return TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return TrialSeeded(lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True), seed)


def make_pruner(cfg: ExperimentConfig, per_fold: int) -> optuna.pruners.BasePruner:
    """The pruner over steps of `per_fold` epochs a tuning fold (pipeline.tuning.steps),
    judging each fold alone after its first `min_epochs` epochs; Hyperband's resource runs
    from `min_epochs` to every tuning fold's epochs."""
    tc = cfg.tune
    if tc.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials)
    elif tc.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=tc.min_epochs,
            max_resource=max(tc.min_epochs, len(tuning_folds(cfg)) * per_fold))
    else:
        return optuna.pruners.NopPruner()
    return PerFold(pruner, per_fold, tc.min_epochs)


def tuning_folds(cfg: ExperimentConfig) -> list[int]:
    n = cfg.folds.n_splits
    folds = list(range(n)) if cfg.tune.folds == "all" else sorted(set(cfg.tune.folds))
    if not set(folds) <= set(range(n)):
        raise UserError(f"tune.folds: {cfg.tune.folds}: the folds are 0 to {n - 1}")
    return folds


def open_study(cfg: ExperimentConfig, per_fold: int) -> optuna.Study:
    """The study `<comp>-<exp>` in the storage, its steps `per_fold` epochs a tuning fold;
    refused when its trials searched another space, metric, folds, steps or base config."""
    url = storage_url(cfg)
    setup = dict(metric=metrics.name(cfg.metric), folds=tuning_folds(cfg), tag=config_hash(cfg),
                 space=cfg.tune.model_dump(mode="json")["space"], steps_per_fold=per_fold)
    study = optuna.create_study(storage=open_storage(url), study_name=study_name(cfg),
                                direction=metrics.direction(cfg.metric), load_if_exists=True,
                                sampler=make_sampler(cfg.tune.sampler, cfg.seed),
                                pruner=make_pruner(cfg, per_fold))
    found = {k: study.user_attrs.get(k) for k in setup}
    if study.trials and found != setup:
        changed = ", ".join(k for k in setup if found[k] != setup[k])
        raise UserError(f"tune.storage: study {study.study_name!r} in {url} was run with other "
                        f"settings ({changed}); set another tune.storage or remove the study")
    for key, value in setup.items():
        study.set_user_attr(key, value)
    return study


def counted(study: optuna.Study, below: int | None = None) -> int:
    """Trials complete, pruned or running (numbered below `below`, when given)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=DONE + (TrialState.RUNNING,))
               if below is None or t.number < below)


def tidy(trial_dir: Path, keep: str) -> None:
    """What a finished trial's folder keeps: everything, its logs only, or nothing."""
    if keep == "none":
        shutil.rmtree(trial_dir, ignore_errors=True)
    elif keep == "logs":
        for pattern in layout.CHECKPOINTS:
            for path in trial_dir.rglob(pattern):
                path.unlink()


def trial_dir(cfg: ExperimentConfig, number: int) -> Path:
    return layout.Run.of(cfg.name, cfg.experiment).trial(number)
