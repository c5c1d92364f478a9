"""Albumentations pipelines: presets, custom YAML lists, and the deterministic eval view."""
from __future__ import annotations

import albumentations as A
import cv2

from pipeline.config import AugmentConfig
from pipeline.errors import UserError


def classics(size: int, hflip: bool, vflip: bool) -> list[A.BasicTransform]:
    """Mirroring, random crops and per-channel colour shifts (R+20, G-20, B+20 style)."""
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
        *([A.HorizontalFlip(p=0.5)] if hflip else []),
        *([A.VerticalFlip(p=0.5)] if vflip else []),
        A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.5),
    ]


def preset(name: str, size: int, hflip: bool = True, vflip: bool = False) -> list[A.BasicTransform]:
    if name == "none":
        return [A.CenterCrop(size, size)]
    base = classics(size, hflip, vflip)
    if name == "light":
        return base
    medium = base + [
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
    ]
    if name == "medium":
        return medium
    return medium + [
        A.HueSaturationValue(10, 20, 10, p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2),
                        hole_width_range=(0.05, 0.2), p=0.5),
    ]


def custom(specs: list[dict], size: int) -> list[A.BasicTransform]:
    """Build transforms from `[{name: RGBShift, r_shift_limit: 20, ...}, ...]` (names, not code)."""
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise UserError(f"augment.custom[{i}].name: {name!r} is not an albumentations transform")
        try:
            out.append(cls(**spec))
        except (TypeError, ValueError) as err:
            raise UserError(f"augment.custom[{i}] ({name}): {str(err).splitlines()[0]}") from None
    return out


def train_transform(cfg: AugmentConfig, size: int, seed: int) -> A.Compose:
    steps = custom(cfg.custom, size) if cfg.custom is not None else preset(cfg.preset, size, cfg.hflip, cfg.vflip)
    return A.Compose(steps + [A.Resize(size, size)], seed=seed)


def eval_transform(size: int) -> A.Compose:
    """Centre crop of the cached image (already resized to size / crop_pct)."""
    return A.Compose([A.CenterCrop(size, size)])
