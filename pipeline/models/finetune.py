"""Transfer learning: layer groups, the unfreeze plan, per-group learning rates, schedules.

A model's parameters fall into layer groups, bottom to top, taken from the model itself
(timm's `group_matcher(coarse=True)`), with the classifier always the last group on its own.
A stage trains the top `k` groups (the head counts as one) and freezes the rest; each group
below the top gets the learning rate of the group above divided by `lr_decay` (or times
`layer_decay`). Every stage restarts its warm-up + cosine (or one-cycle) schedule.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from timm.models import group_parameters
from torch import nn

from pipeline.core.config import ExperimentConfig, StageConfig
from pipeline.core.errors import UserError

SMALL_DATA, LARGE_DATA = 1_000, 10_000  # training images: head only below, everything above


@dataclass(frozen=True)
class Stage:
    epochs: int
    trainable: int  # number of top layer groups that train (the head counts as one)


def classifier_names(model: nn.Module) -> list[str]:
    """Names of the classifier's parameters: `get_classifier()`, else the last Linear layer."""
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
    else:
        clf = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        clf = clf[0] if clf else nn.Identity()
    ids = {id(p) for p in clf.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, bottom to top, the classifier last and alone.

    Groups come from timm's `group_matcher(coarse=True)`; a model without one is grouped by
    its top-level child modules, in registration order.
    """
    head = classifier_names(model)
    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        body = [grouped[k] for k in sorted(grouped)]
    else:
        children: dict[str, list[str]] = {}
        for name, _ in model.named_parameters():
            children.setdefault(name.split(".")[0], []).append(name)
        body = list(children.values())
    body = [[n for n in names if n not in head] for names in body]
    return [names for names in body if names] + [head]


def resolve_trainable(spec, n_groups: int) -> int:
    """`head` -> 1, `all` -> every group, an integer k -> the top k groups (capped at all)."""
    if spec == "head":
        return 1
    if spec == "all":
        return n_groups
    return min(int(spec), n_groups)


def check_finetune(cfg: ExperimentConfig) -> None:
    """Config errors a stage list can have, raised before any work."""
    ft = cfg.finetune
    if ft.policy == "auto" and ft.stages:
        raise UserError("finetune: set either policy: auto or stages, not both")
    for i, stage in enumerate(ft.stages or []):
        if isinstance(stage.train, int) and stage.train < 1:
            raise UserError(f"finetune.stages[{i}].train: {stage.train} groups; "
                            f"use head, all or an integer >= 1")


def auto_stages(n_train: int, epochs: int, n_groups: int) -> list[StageConfig]:
    """Freeze depth from the training-set size, logged to stderr.

    Under SMALL_DATA images only the new head trains; under LARGE_DATA a head warm-up
    (a quarter of the epochs) is followed by the top half of the groups; above, one head
    epoch is followed by everything.
    """
    if n_train < SMALL_DATA or epochs < 2:
        plan, why = [StageConfig(epochs=epochs, train="head")], "little data: head only"
    elif n_train < LARGE_DATA:
        head = max(1, epochs // 4)
        plan = [StageConfig(epochs=head, train="head"),
                StageConfig(epochs=epochs - head, train=max(2, (n_groups + 1) // 2))]
        why = "medium data: head, then the top half of the groups"
    else:
        plan = [StageConfig(epochs=1, train="head"), StageConfig(epochs=epochs - 1, train="all")]
        why = "much data: one head epoch, then everything"
    print(f"finetune.policy=auto: {n_train} training images, {why}: stages "
          f"{[(s.epochs, s.train) for s in plan]}", file=sys.stderr)
    return plan


def fit_stages(stages: list[StageConfig], epochs: int) -> list[StageConfig]:
    """Rescale the stages' epochs to add up to `epochs`, each keeping at least one.

    Used when `train.epochs` is set explicitly (e.g. `SET=train.epochs=3` for a quick run);
    with fewer epochs than stages, the last stages are kept at one epoch each.
    """
    total = sum(s.epochs for s in stages)
    if epochs == total:
        return stages
    if epochs < len(stages):
        counts, stages = [1] * epochs, stages[len(stages) - epochs:]
    else:
        raw = [s.epochs * epochs / total for s in stages]
        counts = [max(1, math.floor(r)) for r in raw]
        while sum(counts) < epochs:
            counts[max(range(len(raw)), key=lambda i: raw[i] - counts[i])] += 1
        while sum(counts) > epochs:
            counts[max(range(len(raw)), key=lambda i: (counts[i] - raw[i], counts[i]))] -= 1
    fitted = [s.model_copy(update={"epochs": n}) for s, n in zip(stages, counts)]
    print(f"train.epochs={epochs}: finetune.stages rescaled to "
          f"{[(s.epochs, s.train) for s in fitted]}", file=sys.stderr)
    return fitted


def stage_plan(cfg: ExperimentConfig, n_train: int, n_groups: int) -> list[Stage]:
    """The stages to run: `finetune.stages` (default: one stage training everything) or auto.

    Explicit stages set the epochs; an explicitly set `train.epochs` rescales them.
    """
    check_finetune(cfg)
    ft = cfg.finetune
    if ft.policy == "auto":
        stages = auto_stages(n_train, cfg.train.epochs, n_groups)
    elif ft.stages and "epochs" in cfg.train.model_fields_set:
        stages = fit_stages(ft.stages, cfg.train.epochs)
    else:
        stages = ft.stages or [StageConfig(epochs=cfg.train.epochs, train="all")]
    return [Stage(s.epochs, resolve_trainable(s.train, n_groups)) for s in stages]


def decay_factors(cfg: ExperimentConfig) -> tuple[float, float | None]:
    """(lr_decay, layer_decay) for the run. Discriminative rates protect pretrained features;
    a randomly initialised model has none, so it trains every group at the base rate unless
    `finetune.lr_decay` or `finetune.layer_decay` is set explicitly."""
    ft = cfg.finetune
    if cfg.model.pretrained is False and not {"lr_decay", "layer_decay"} & ft.model_fields_set:
        return 1.0, None
    return ft.lr_decay, ft.layer_decay


def group_lrs(base_lr: float, n_groups: int, lr_decay: float, layer_decay: float | None) -> list[float]:
    """Top group (head) gets base_lr; each group below gets the one above / lr_decay (or x layer_decay)."""
    factor = layer_decay if layer_decay is not None else 1.0 / lr_decay
    return [base_lr * factor ** (n_groups - 1 - i) for i in range(n_groups)]


def schedule_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at `step` (0-based) of a stage of `total` steps.

    cosine: linear warm-up over `warmup` steps, then cosine decay towards 0.
    onecycle: cosine ramp from 1/25 up to 1 over max(warmup, 30% of the steps), then cosine
    decay towards 0.
    """
    if schedule == "onecycle":
        rise = max(warmup, int(0.3 * total), 1)
        if step < rise:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / rise))
        warmup = rise
    elif warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: norms, biases (any 0-1 dim tensor) and the model's list."""
    listed = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n in listed}


def param_groups(model: nn.Module, groups: list[list[str]], lrs: list[float], weight_decay: float):
    """One AdamW param group per (layer group, decay/no-decay), tagged with its layer group."""
    params = dict(model.named_parameters())
    skip = no_decay_names(model)
    out = []
    for gi, (names, lr) in enumerate(zip(groups, lrs)):
        decay = [params[n] for n in names if n not in skip]
        no_decay = [params[n] for n in names if n in skip]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                out.append(dict(params=ps, lr=lr, base_lr=lr, weight_decay=wd, layer_group=gi))
    return out


def set_lrs(optimizer: torch.optim.Optimizer, factor: float, first_trainable: int) -> None:
    """Scale every group's base rate by the schedule `factor`; frozen groups get 0."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor if g["layer_group"] >= first_trainable else 0.0


def group_lr_row(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{"lr_group0": ..., ...}: the learning rate each layer group has now, bottom to top."""
    lrs = {g["layer_group"]: float(g["lr"]) for g in optimizer.param_groups}
    return {f"lr_group{i}": lrs[i] for i in sorted(lrs)}


def apply_freeze(model: nn.Module, groups: list[list[str]], trainable: int) -> set[str]:
    """requires_grad only for the top `trainable` groups; returns the frozen parameter names.

    Frozen parameters get no gradient, so AdamW gives them no update, no weight decay and
    no moment updates.
    """
    frozen = {n for g in groups[: len(groups) - trainable] for n in g}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return frozen


def freeze_batchnorm(model: nn.Module, frozen: set[str]) -> None:
    """Put BatchNorm layers whose parameters are frozen in eval mode (running stats stay put)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
            if own and all(n in frozen for n in own):
                module.eval()
