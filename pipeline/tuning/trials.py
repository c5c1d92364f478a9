"""A tuning study's trials: each trains the tuning folds through the train stage's
`train_fold` with the trial's values, in its own folder, reporting the validation score after
every epoch (steps: pipeline.tuning.steps) so the pruner can stop it; and the one-line story of
each trial (its start, its end, a warning when it looks diverged)."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from pipeline.core import layout, metrics
from pipeline.core.config import ExperimentConfig, validate_experiment
from pipeline.training.experiment import prepare
from pipeline.training.loop import train_fold
from pipeline.tuning.space import Param, base_values, suggest, with_values
from pipeline.tuning.steps import step
from pipeline.tuning.study import tidy, trial_dir, tuning_folds


def objective(cfg: ExperimentConfig, data: dict, space: list[Param],
              per_fold: int) -> Callable[[optuna.Trial], float]:
    """Train the tuning folds with the trial's values; the metric on their held-out rows.
    The base trial (user attribute `base`) takes the experiment's own values and is never
    pruned: it is what the others must beat."""
    folds = tuning_folds(cfg)
    own = base_values(data, space)

    def run_trial(trial: optuna.Trial) -> float:
        base = bool(trial.user_attrs.get("base"))
        values = {p.path: suggest(trial, p) for p in space if not base or p.path in own}
        print(start_line(trial.number, trial.user_attrs, values), file=sys.stderr)
        exp = prepare(validate_experiment(with_values(data, values), f"trial {trial.number}"))
        out, epochs = layout.Run(trial_dir(cfg, trial.number)), []

        def report(position: int, epoch: int, score: float) -> None:
            epochs.append(epoch)
            trial.report(score, step(position, epoch + 1, per_fold))
            if not base and trial.should_prune():
                raise optuna.TrialPruned(f"at epoch {epoch + 1} of fold {folds[position]} "
                                         f"({metrics.name(cfg.metric)} {score:.5f})")

        try:
            frames = []
            for position, fold in enumerate(folds):
                train_fold(exp, fold, out.fold(fold),
                           on_epoch=lambda e, v, p=position: report(p, e, v))
                frames.append(exp.fold_oof(fold, out.best(fold)))
            oof = pd.concat(frames)
            comp = exp.comp
            y = comp.y[pd.Index(comp.train["id"]).get_indexer(oof["id"])]
            trial.set_user_attr("baseline", metrics.score(cfg.metric, comp.task, y,
                                                          comp.task.baseline(y), ids=oof["id"]))
            return metrics.score(cfg.metric, comp.task, y, oof[list(comp.classes)].to_numpy(),
                                 ids=oof["id"])
        finally:
            trial.set_user_attr("epochs", len(epochs))
            tidy(out.dir, cfg.tune.keep)

    return run_trial


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(values: dict[str, Any]) -> str:
    """`train.lr=0.0031 augment.preset=light`."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "no searched key"


def start_line(number: int, attrs: dict, values: dict[str, Any]) -> str:
    """`tune: trial 3: train.lr=0.0031 augment.preset=light` (the base trial and retries say so)."""
    why = ["the base config"] if attrs.get("base") else []
    if "retry_of" in attrs:
        why.append(f"retry of trial {attrs['retry_of']}")
    return f"tune: trial {number}" + (f" ({', '.join(why)})" if why else "") + \
        f": {params_text(values)}"


def diverged(metric: str, score: float, baseline: float | None) -> bool:
    """A score that is not finite, or no better than the trivial baseline's."""
    return not math.isfinite(score) or (baseline is not None
                                        and not metrics.better(metric, score, baseline))


def score_line(t: FrozenTrial, metric: str, score: float) -> str:
    """`tune: trial 3: accuracy 0.81250`, with a warning when the score looks diverged."""
    head = f"tune: trial {t.number}: {metrics.name(metric)} {score:.5f}"
    baseline = t.user_attrs.get("baseline")
    if not diverged(metric, score, baseline):
        return head
    why = ("not finite" if not math.isfinite(score)
           else f"no better than the trivial baseline's {baseline:.5f}")
    return f"{head}, {why}: diverged? try a lower lr ({params_text(t.params)})"
