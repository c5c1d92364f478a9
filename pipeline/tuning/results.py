"""What a tuning study leaves: best.json, report.md with its plots, and the tuned experiment
`<exp>-tuned.yaml` (the best trial's values written over the experiment's own keys)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from pipeline.core import layout, metrics
from pipeline.core.artifacts import write_json, write_text
from pipeline.core.config import ExperimentConfig, apply_overrides, experiment_overrides, read_yaml
from pipeline.reports.tune import write_report
from pipeline.tuning.space import set_value, split_path
from pipeline.tuning.study import FOLD_STEP, storage_url, study_dir, tuning_folds


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
        scores = layout.Run.of(cfg.name, name).scores
        out[label] = json.loads(scores.read_text())["cv"] if scores.is_file() else None
    return out
