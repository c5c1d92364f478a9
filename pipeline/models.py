"""Model factory over timm's registry (classic CNNs included) with pretrained loading."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

import pipeline.classic  # noqa: F401  (registers lenet5 and alexnet in timm)
from pipeline.config import ModelConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """How to feed the model: from its pretrained config unless the experiment overrides."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def check_backbone(name: str) -> None:
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"model.backbone: unknown model {name!r}{hint}")


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 3) -> torch.nn.Module:
    """Build `cfg.backbone` with a fresh `num_classes` head, from random, hub or local weights."""
    check_backbone(cfg.backbone)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    if cfg.pretrained is False:
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    if cfg.pretrained is True:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        try:
            return timm.create_model(cfg.backbone, pretrained=True, **kwargs)
        except Exception as err:  # network, hub or missing-weights errors all mean the same here
            raise UserError(
                f"model.pretrained: true: could not download weights for {cfg.backbone!r} "
                f"({type(err).__name__}); pass a local timm-format file: "
                f"model.pretrained=path/to/weights.safetensors"
            ) from None
    path = Path(cfg.pretrained)
    if not path.is_file():
        raise UserError(f"model.pretrained: weights file {path} not found")
    try:
        return timm.create_model(cfg.backbone, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise UserError(f"model.pretrained: {path} does not fit {cfg.backbone!r}: {first}") from None


def input_spec(model: torch.nn.Module, cfg: ModelConfig) -> InputSpec:
    data_cfg = resolve_data_config({}, model=model)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else data_cfg.get("crop_pct", 1.0)
    return InputSpec(tuple(data_cfg["mean"]), tuple(data_cfg["std"]), float(crop_pct))


def cache_size(image_size: int, crop_pct: float) -> int:
    """Side of the stored image: crops of `image_size` come from an image `size / crop_pct`."""
    return int(round(image_size / crop_pct))
