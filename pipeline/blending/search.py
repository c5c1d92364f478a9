"""The blend's weight search: seeded optuna studies over simplex weights (and the blend mode),
and the study's storage.

Determinism: by default every search is a fresh study seeded by `seed` (in memory; the
ensemble stage saves its top-level study to study.db through a temporary file), so the same
inputs give byte-identical results. With `storage: <optuna database URL>` the ensemble's
top-level study lives there and persists: a rerun reuses its trials, and several workers may
tune it at once, unseeded (seeded workers would propose the same trials).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy.exc

from pipeline.blending.blend import U_LOW, Blender, simplex_weights
from pipeline.core import metrics
from pipeline.core.artifacts import atomic_path
from pipeline.core.config import EnsembleConfig
from pipeline.core.errors import UserError


def new_study(metric, seed: int | None, storage=None, study_name: str | None = None):
    """A study in the metric's direction, sampled by multivariate TPE seeded with `seed`.

    With a shared `storage` several workers may tune the same study at once; pass seed=None
    there so that the workers do not propose the same trials.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.create_study(direction=metrics.direction(metric), sampler=sampler,
                               storage=storage, study_name=study_name, load_if_exists=True)


@dataclass
class Tuned:
    weights: np.ndarray
    mode: str
    score: float


def tune(blender: Blender, y: np.ndarray, task, metric, trials: int, modes: tuple[str, ...],
         study: optuna.Study, folds: np.ndarray | None = None) -> Tuned:
    """Search simplex weights (and the mode, as a categorical, when several) to optimise the CV
    headline of `metric` (metrics.headline, by `folds`) on `blender`'s blend, until `study`
    holds `trials` complete trials.

    The first trial is equal weights. Each trial stores its actual weights and mode as user
    attributes. Trials already in the study count, so a rerun on a finished study samples
    nothing and several workers sharing one study stop together at `trials`.
    """
    m = blender.probas.shape[0]

    def objective(trial: optuna.Trial) -> float:
        u = np.array([trial.suggest_float(f"u{i}", U_LOW, 1.0) for i in range(m)])
        mode = trial.suggest_categorical("mode", list(modes)) if len(modes) > 1 else modes[0]
        w = simplex_weights(u)
        trial.set_user_attr("weights", w.tolist())
        trial.set_user_attr("mode", mode)
        return metrics.headline(metric, task, y, folds, blender(w, mode))

    equal = {f"u{i}": float(np.exp(-1.0)) for i in range(m)}
    study.enqueue_trial(equal | ({"mode": modes[0]} if len(modes) > 1 else {}),
                        skip_if_exists=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    remaining = trials - len(complete)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining,
                       callbacks=[optuna.study.MaxTrialsCallback(trials)])
    best = study.best_trial
    return Tuned(np.array(best.user_attrs["weights"]), best.user_attrs["mode"], best.value)


def open_study(cfg: EnsembleConfig, experiments: list[str], modes: tuple[str, ...]) -> optuna.Study:
    """The ensemble's top-level study: a fresh seeded one in memory, or the one named
    `<comp>-<ensemble>` in `cfg.storage` (refused when it was tuned for another metric,
    experiments or modes)."""
    setup = dict(metric=metrics.name(cfg.metric), experiments=experiments, modes=list(modes))
    if cfg.storage:
        name = f"{cfg.name}-{cfg.experiment}"
        try:
            study = new_study(cfg.metric, None, cfg.storage, name)
        except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as err:
            raise UserError(f"storage: optuna cannot open {cfg.storage!r} "
                            f"({str(err).splitlines()[0]})") from None
        found = {k: study.user_attrs.get(k) for k in setup}
        if study.trials and found != setup:
            raise UserError(f"storage: study {name!r} in {cfg.storage} was tuned for {found}, "
                            f"not {setup}; set another storage or ensemble name")
    else:
        study = new_study(cfg.metric, cfg.seed)
    for key, value in setup.items():
        study.set_user_attr(key, value)
    return study


def save_study(study: optuna.Study, path: Path, name: str) -> None:
    """Copy an in-memory study into a SQLite file, atomically. The temporary file is written
    without syncs or a rollback journal: it only takes its final name once complete."""
    with atomic_path(path) as tmp:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(tmp)
            connection.execute("PRAGMA synchronous = OFF")
            connection.execute("PRAGMA journal_mode = MEMORY")
            return connection

        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}",
                                             engine_kwargs={"creator": connect})
        saved = optuna.create_study(storage=storage, study_name=name,
                                    direction=study.direction.name.lower())
        for key, value in study.user_attrs.items():
            saved.set_user_attr(key, value)
        saved.add_trials(study.trials)
        storage.engine.dispose()
