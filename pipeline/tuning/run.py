"""The tuning stage's work (`make tune`; stage docstring: pipeline.tune)."""
from __future__ import annotations

import sys
from pathlib import Path

import optuna

from pipeline.core import metrics
from pipeline.core.config import experiment_data, validate_experiment
from pipeline.core.errors import UserError
from pipeline.models.pretrained import check_pretrained
from pipeline.tuning.results import results
from pipeline.tuning.space import parse_space
from pipeline.tuning.study import open_study, study_dir
from pipeline.tuning.trials import work


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
