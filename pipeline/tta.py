"""Test-time augmentation: views of a batch, batched through the model, merged per image."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

VIEW_SETS = ("none", "hflip", "five_crop", "ten_crop", "dihedral8")


def _crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[..., top:top + size, left:left + size]


def centre(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return _crop(x, (h - size) // 2, (w - size) // 2, size)


def five_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = x.shape[-2:]
    return [_crop(x, 0, 0, size), _crop(x, 0, w - size, size), _crop(x, h - size, 0, size),
            _crop(x, h - size, w - size, size), centre(x, size)]


def views(x: torch.Tensor, size: int, view_set: str) -> list[torch.Tensor]:
    """Views of NxCxHxW images (already resized to size / crop_pct), each NxCx size x size."""
    c = centre(x, size)
    if view_set == "none":
        return [c]
    if view_set == "hflip":
        return [c, c.flip(-1)]
    if view_set == "five_crop":
        return five_crops(x, size)
    if view_set == "ten_crop":
        crops = five_crops(x, size)
        return crops + [v.flip(-1) for v in crops]
    if view_set == "dihedral8":
        out = []
        for flipped in (c, c.flip(-1)):
            out += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
        return out
    raise ValueError(f"unknown view set {view_set!r}")


def merge(proba: torch.Tensor, how: str) -> torch.Tensor:
    """V x N x K view probabilities -> N x K: mean, or geometric mean renormalised."""
    if how == "mean":
        return proba.mean(0)
    logp = torch.log(proba.clamp_min(1e-12)).mean(0)
    return F.softmax(logp, dim=1)


def predict_views(model, x: torch.Tensor, size: int, view_set: str, how: str,
                  max_batch: int = 1024) -> torch.Tensor:
    """All views of a batch in one forward pass (chunked to `max_batch` images); N x K."""
    vs = views(x, size, view_set)
    stacked = torch.cat(vs)
    logits = torch.cat([model(chunk) for chunk in stacked.split(max_batch)])
    proba = F.softmax(logits.float(), dim=1).view(len(vs), x.shape[0], -1)
    return merge(proba, how)


def average_folds(per_fold: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(per_fold), axis=0)
