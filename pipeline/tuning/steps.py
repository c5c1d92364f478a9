"""How a trial's epochs become optuna steps, so that the pruner compares like with like over
several tuning folds: epoch k (from 1) of the trial's i-th tuning fold (from 0) is step
i * E + k, E the most epochs a fold of any trial of the search space trains. Step s of every
trial is the same fold and epoch, and the steps count the epochs trained (Hyperband's resource).
The pruner sees a trial's current fold alone (PerFold)."""
from __future__ import annotations

import copy
import itertools

import optuna

from pydantic import ValidationError

from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.tuning.space import Param, with_values

SHAPING = ("train.epochs", "finetune.")  # the keys that decide how many epochs a fold trains


def fold_epochs(cfg: ExperimentConfig) -> int:
    """Epochs one fold trains (the total of models.finetune.stage_plan): the explicit stages'
    sum unless `train.epochs` is set or the policy is auto, else `train.epochs`."""
    ft = cfg.finetune
    if ft.stages and ft.policy != "auto" and "epochs" not in cfg.train.model_fields_set:
        return sum(stage.epochs for stage in ft.stages)
    return cfg.train.epochs


def steps_per_fold(data: dict, space: list[Param]) -> int:
    """E: the most epochs a fold of any trial trains: every epoch-shaping range at its high,
    over every combination of the epoch-shaping choices, and the experiment as written."""
    shaping = [p for p in space if p.path.startswith(SHAPING)]
    highs = {p.path: p.high for p in shaping if p.type != "categorical"}
    choices = [[(p.path, c) for c in p.choices] for p in shaping if p.type == "categorical"]
    found = [fold_epochs(ExperimentConfig.model_validate(with_values(data, {})))]
    for combination in itertools.product(*choices):
        try:
            cfg = ExperimentConfig.model_validate(with_values(data, {**highs, **dict(combination)}))
        except (ValidationError, UserError):  # no trial can have these values
            continue
        found.append(fold_epochs(cfg))
    return max(found)


def step(position: int, epoch: int, per_fold: int) -> int:
    """The step of epoch `epoch` (from 1) of the tuning fold at `position` (from 0)."""
    return position * per_fold + epoch


def fold_epoch(step_: int, per_fold: int) -> tuple[int, int]:
    """(tuning-fold position, epoch from 1) of a step."""
    position, epoch = divmod(step_ - 1, per_fold)
    return position, epoch + 1


class PerFold(optuna.pruners.BasePruner):
    """Judges a trial on its current tuning fold alone, and never within that fold's first
    `min_epochs` epochs (a pruner's warm-up steps and its best-value-so-far would otherwise
    count from the first fold only)."""

    def __init__(self, pruner: optuna.pruners.BasePruner, per_fold: int, min_epochs: int):
        self.pruner, self.per_fold, self.min_epochs = pruner, per_fold, min_epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.last_step is None:
            return False
        position, epoch = fold_epoch(trial.last_step, self.per_fold)
        if epoch < self.min_epochs:
            return False
        view = copy.copy(trial)
        view.intermediate_values = {s: v for s, v in trial.intermediate_values.items()
                                    if s > position * self.per_fold}
        return self.pruner.prune(study, view)
