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
from pipeline.tuning.study import storage_url, study_dir, tuning_folds


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


def base_score(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial | None, bool]:
    """(the completed trial of the experiment as written, or None; whether one is still queued
    or running)."""
    base = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("base")]
    done = [t for t in base if t.state == TrialState.COMPLETE]
    pending = any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in base)
    return (done[-1] if done else None), pending


def verdict(metric, best: optuna.trial.FrozenTrial, base: optuna.trial.FrozenTrial | None,
            pending: bool, target: Path) -> tuple[bool, str]:
    """(does the best trial beat the base config, one line saying so and what is written)."""
    name = metrics.name(metric)
    found = f"best {name} {best.value:.5f} (trial {best.number}"
    if base is not None:
        if best.number != base.number and metrics.better(metric, best.value, base.value):
            return True, f"{found}; base config {base.value:.5f}) -> {target}"
        return False, (f"no trial beat the base config ({name} {base.value:.5f}, trial "
                       f"{base.number}): it stays best; {target} not written")
    if pending:
        return False, f"{found}); the base config has no score yet: {target} not written"
    return True, f"{found}; the base config failed) -> {target}"


def results(cfg: ExperimentConfig, path: Path, data: dict, study: optuna.Study,
            overrides: list[str] | None = None) -> dict | None:
    """best.json, report.md and plots, and the tuned config, written only when the best trial
    beats the base config on the tuning folds; None when no trial completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("tune: no trial completed yet", file=sys.stderr)
        return None
    (base, pending), best = base_score(study), study.best_trial
    url, folds, target = storage_url(cfg), tuning_folds(cfg), tuned_path(path)
    beats, line = verdict(cfg.metric, best, base, pending, target)
    if beats:
        note = (f"Tuned by `make tune` from {path.name}: study {study.study_name!r} in {url},\n"
                f"best trial {best.number}: {metrics.name(cfg.metric)} {best.value:.5f} on folds "
                f"{folds} (optimistic: chosen on those folds)"
                + (f"; the base config {base.value:.5f}." if base is not None else "."))
        text = tuned_yaml(path, data, best.params, note, overrides)
        if not target.is_file() or target.read_text() != text:
            write_text(text, target)
    summary = dict(study=study.study_name, storage=url, metric=metrics.name(cfg.metric), folds=folds,
                   best_trial=best.number, best_value=best.value, best_params=best.params,
                   base_trial=None if base is None else base.number,
                   base_value=None if base is None else base.value,
                   tuned_config=str(target) if beats else None, verdict=line,
                   trials={s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                           for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                     TrialState.RUNNING)})
    write_json(summary, study_dir(cfg) / "best.json")
    write_report(study, cfg, summary, study_dir(cfg), cv_scores(cfg, target),
                 study.user_attrs["steps_per_fold"])
    return summary


def cv_scores(cfg: ExperimentConfig, target: Path) -> dict[str, float | None]:
    """Full-CV scores of the untuned and the tuned experiment, where trained."""
    out = {}
    for label, name in (("untuned", cfg.experiment), ("tuned", target.stem)):
        scores = layout.Run.of(cfg.name, name).scores
        out[label] = json.loads(scores.read_text())["cv"] if scores.is_file() else None
    return out
