"""Transfer learning: layer groups, the unfreeze plan, per-group learning rates, schedules."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from pipeline.config import FinetuneConfig, StageConfig


@dataclass(frozen=True)
class Stage:
    epochs: int
    trainable: int  # number of top layer groups that train (the head counts as one)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, bottom to top, head last."""
    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        return [grouped[k] for k in sorted(grouped)]
    head = {f"{n}" for n, _ in _classifier_params(model)}
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        if name not in head:
            groups.setdefault(name.split(".")[0], []).append(name)
    return list(groups.values()) + [sorted(head)]


def _classifier_params(model: nn.Module):
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        ids = {id(p) for p in clf.parameters()}
        return [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    last = list(model.named_parameters())[-2:]
    return last


def resolve_trainable(spec, n_groups: int) -> int:
    if spec == "head":
        return 1
    if spec == "all":
        return n_groups
    return max(1, min(int(spec), n_groups))


def auto_stages(n_train: int, epochs: int) -> list[StageConfig]:
    """Freeze depth from data size: little data trains the head, more unfreezes deeper."""
    head = max(1, epochs // 3)
    if n_train < 500:
        plan = [StageConfig(epochs=epochs, train="head")]
    elif n_train < 5000:
        plan = [StageConfig(epochs=head, train="head"), StageConfig(epochs=max(1, epochs - head), train="all")]
    else:
        plan = [StageConfig(epochs=1, train="head"), StageConfig(epochs=max(1, epochs - 1), train="all")]
    print(f"finetune.policy=auto: {n_train} training images -> stages "
          f"{[(s.epochs, s.train) for s in plan]}", file=sys.stderr)
    return plan


def stage_plan(cfg: FinetuneConfig, epochs: int, n_train: int, n_groups: int) -> list[Stage]:
    if cfg.policy == "auto":
        stages = auto_stages(n_train, epochs)
    else:
        stages = cfg.stages or [StageConfig(epochs=epochs, train="all")]
    return [Stage(s.epochs, resolve_trainable(s.train, n_groups)) for s in stages]


def group_lrs(base_lr: float, n_groups: int, lr_decay: float, layer_decay: float | None) -> list[float]:
    """Top group (head) gets base_lr; each group below gets the one above / lr_decay (or x layer_decay)."""
    factor = layer_decay if layer_decay is not None else 1.0 / lr_decay
    return [base_lr * factor ** (n_groups - 1 - i) for i in range(n_groups)]


def schedule_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """LR multiplier at `step` of a stage: linear warm-up, then cosine (or one-cycle) decay."""
    if kind == "onecycle":
        warmup = max(warmup, int(0.3 * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, groups: list[list[str]], lrs: list[float], weight_decay: float):
    """One AdamW param group per (layer group, decay/no-decay); norms and biases get no decay."""
    params = dict(model.named_parameters())
    out = []
    for gi, (names, lr) in enumerate(zip(groups, lrs)):
        decay = [params[n] for n in names if params[n].ndim > 1]
        no_decay = [params[n] for n in names if params[n].ndim <= 1]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                out.append(dict(params=ps, lr=lr, base_lr=lr, weight_decay=wd, layer_group=gi))
    return out


def apply_freeze(model: nn.Module, groups: list[list[str]], trainable: int) -> set[str]:
    """requires_grad only for the top `trainable` groups; returns the frozen parameter names."""
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
