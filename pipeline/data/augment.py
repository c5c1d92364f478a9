"""Augmentation: albumentations presets, custom YAML lists, the eval view, mixup/cutmix.

Pipelines are plain `A.Compose` objects; the data path runs them a batch at a time
(`pipeline.data.batch_augment`) when every transform has a batched equivalent, as all presets do.
"""
from __future__ import annotations

import warnings

import albumentations as A
import cv2
from timm.data import Mixup

from pipeline.core.config import AugmentConfig
from pipeline.core.errors import UserError


def classics(size: int, hflip: bool, vflip: bool) -> list[A.BasicTransform]:
    """Random crops, mirroring and per-channel colour shifts (R+20, G-20, B+20 style)."""
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
        *([A.HorizontalFlip(p=0.5)] if hflip else []),
        *([A.VerticalFlip(p=0.5)] if vflip else []),
        A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=0.5),
    ]


def preset(name: str, size: int, hflip: bool = True, vflip: bool = False) -> list[A.BasicTransform]:
    """Transforms of a preset producing `size` x `size` images from a cache image of any side.

    Geometric transforms come first so the batched data path resamples each image once.
    Hue and saturation shifts leave 1-channel images alone; value shifts still apply.
    """
    if name == "none":
        return [A.CenterCrop(size, size)]
    crop, *flips, shift = classics(size, hflip, vflip)
    if name == "light":
        return [crop, *flips, shift]
    affine = A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                      border_mode=cv2.BORDER_REFLECT_101, p=0.5)
    medium = [crop, *flips, affine, shift, A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    if name == "medium":
        return medium
    if name == "heavy":
        return medium + [
            A.HueSaturationValue(10, 20, 10, p=0.5),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2),
                            hole_width_range=(0.05, 0.2), p=0.5),
        ]
    raise UserError(f"augment.preset: unknown preset {name!r}")


def custom(specs: list[dict]) -> list[A.BasicTransform]:
    """Build transforms from `[{name: RGBShift, r_shift_limit: 20, ...}, ...]` (names, not code)."""
    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise UserError(f"augment.custom[{i}].name: {name!r} is not an albumentations transform")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out.append(cls(**spec))
        except (TypeError, ValueError) as err:
            raise UserError(f"augment.custom[{i}] ({name}): {str(err).splitlines()[0]}") from None
        for w in caught:
            if "not valid for transform" in str(w.message):  # albumentations only warns on typos
                raise UserError(f"augment.custom[{i}] ({name}): {w.message}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def train_transform(cfg: AugmentConfig, size: int, seed: int) -> A.Compose:
    """The training pipeline; a final resize makes every output `size` x `size`."""
    steps = (custom(cfg.custom) if cfg.custom is not None
             else preset(cfg.preset, size, cfg.hflip, cfg.vflip))
    return A.Compose(steps + [A.Resize(size, size)], seed=seed)


def eval_transform(size: int) -> A.Compose:
    """Deterministic centre crop of the cached image (already resized to size / crop_pct)."""
    return A.Compose([A.CenterCrop(size, size)])


def mixer(cfg: AugmentConfig, num_classes: int, label_smoothing: float,
          batch_size: int) -> Mixup | None:
    """timm's Mixup/CutMix (targets become soft, rows summing to 1), or None when both are off."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    if batch_size % 2:
        raise UserError(f"train.batch_size: mixup/cutmix pairs images, so it must be even "
                        f"(got {batch_size})")
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                 switch_prob=cfg.switch_prob, label_smoothing=label_smoothing,
                 num_classes=num_classes)
