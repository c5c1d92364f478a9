"""Model factory over timm's registry (the classic CNNs included): a fresh head sized for the
competition on random, hub or local weights (pipeline.models.pretrained), and how to feed it.

The classifier is always new, sized for the competition's classes and, over pretrained
features, started at zero. `model.drop_path_rate` (stochastic depth) is passed to timm where it
is set; an architecture without DropPath layers refuses it in one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.layers import DropPath

import pipeline.models.classic  # noqa: F401  (registers lenet5 and alexnet in timm)
from pipeline.core.config import ExperimentConfig, ModelConfig
from pipeline.core.errors import UserError
from pipeline.models.pretrained import (cached_hub_file, check_backbone, check_fits,
                                        classifier_names, download, read_state_dict)


@dataclass(frozen=True)
class InputSpec:
    """How to feed the model: from its pretrained config unless the experiment overrides."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 3) -> torch.nn.Module:
    """Build `cfg.backbone` with a fresh `num_classes` head, from random, hub or local weights,
    with stochastic depth at `cfg.drop_path_rate` where it is set."""
    check_backbone(cfg.backbone)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    if not cfg.drop_path_rate:
        return _build(cfg, kwargs)
    refused = UserError(f"model.drop_path_rate: {cfg.backbone!r} has no stochastic depth "
                        f"(DropPath) layers; set it to 0 or pick an architecture that has them")
    try:
        model = _build(cfg, dict(kwargs, drop_path_rate=cfg.drop_path_rate))
    except TypeError as err:  # an architecture whose constructor does not take the rate
        if "drop_path_rate" in str(err):
            raise refused from None
        raise
    if not any(isinstance(m, DropPath) for m in model.modules()):  # took it and ignored it
        raise refused
    return model


def _build(cfg: ModelConfig, kwargs: dict) -> torch.nn.Module:
    """The model from random, hub or local weights, timm's keyword arguments `kwargs`."""
    if cfg.pretrained is False:
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    cached = cached_hub_file(cfg.backbone) if cfg.pretrained is True else None
    if cfg.pretrained is True and cached is None:
        return zero_head(download(cfg.backbone, kwargs))
    path = cached or Path(cfg.pretrained)
    source = f"cached hub weights {cached}" if cached else str(path)
    state_dict = read_state_dict(path)
    check_fits(cfg.backbone, state_dict, source)
    heads = tuple(f"{n}." for n in classifier_names(cfg.backbone))
    body = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    overlay = dict(state_dict=body, num_classes=0)  # no head in the file: timm builds a fresh one
    try:
        model = timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=overlay,
                                  **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"model.pretrained: {source} does not fit {cfg.backbone!r}: "
                        f"{str(err).strip().splitlines()[0][:160]}") from None
    return zero_head(model)


def zero_head(model: torch.nn.Module) -> torch.nn.Module:
    """Start a fresh classifier over pretrained features at zero (as BiT does): the first
    predictions are uniform instead of large random logits from large feature values."""
    for p in model.get_classifier().parameters():
        torch.nn.init.zeros_(p)
    return model


def input_spec(model: torch.nn.Module, cfg: ModelConfig) -> InputSpec:
    """Mean, std and crop fraction from the model's pretrained config (timm's resolve_data_config)."""
    data_cfg = resolve_data_config({}, model=model)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else data_cfg.get("crop_pct", 1.0)
    return InputSpec(tuple(data_cfg["mean"]), tuple(data_cfg["std"]), float(crop_pct))


def cache_size(image_size: int, crop_pct: float) -> int:
    """Side of the stored image: crops of `image_size` come from an image `size / crop_pct`."""
    return int(round(image_size / crop_pct))


def experiment_input(cfg: ExperimentConfig, n_classes: int) -> tuple[InputSpec, int]:
    """The experiment's input spec (from the model built without weights) and cached side."""
    probe = create_model(cfg.model.model_copy(update={"pretrained": False}), n_classes,
                         cfg.data.channels)
    spec = input_spec(probe, cfg.model)
    return spec, cache_size(cfg.image_size, spec.crop_pct)
