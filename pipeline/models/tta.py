"""Test-time augmentation: named views of a batch, one forward pass for all of them, merged per image.

Views are cut from the cached image (resized to `size / crop_pct`), so every crop has the
training size; the centre view is exactly the train stage's evaluation crop. A zoomed view
(`scale` != 1: multiscale) cuts `size * scale` pixels, clipped to the image, and resizes them
to the training size (bilinear, antialiased, rounded back to the cache's uint8).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class View(NamedTuple):
    """A crop of the cached image, resized to the training size when zoomed, optionally
    mirrored, then turned by `rot90` quarter turns."""

    crop: str  # centre, top_left, top_right, bottom_left, bottom_right
    hflip: bool = False
    rot90: int = 0  # counter-clockwise quarter turns, applied after the flip
    scale: float = 1.0  # the crop's side as a fraction of the training size


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
ZOOMS = (1.0, 0.9, 1 / 0.9)  # multiscale: the centre crop, zoomed in, zoomed out
_FIVE = tuple(View(c) for c in CORNERS + ("centre",))
VIEW_SETS: dict[str, tuple[View, ...]] = {
    "none": (View("centre"),),
    "hflip": (View("centre"), View("centre", True)),
    "five_crop": _FIVE,
    "ten_crop": _FIVE + tuple(v._replace(hflip=True) for v in _FIVE),
    "dihedral8": tuple(View("centre", f, k) for f in (False, True) for k in range(4)),
    "multiscale": tuple(View("centre", scale=z) for z in ZOOMS),
}


def crop_offset(crop: str, height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a `size` crop; the centre rounds down like albumentations' CenterCrop."""
    if crop == "centre":
        return (height - size) // 2, (width - size) // 2
    vertical, horizontal = crop.split("_")
    return (0 if vertical == "top" else height - size), (0 if horizontal == "left" else width - size)


def crop_box(view: View, height: int, width: int, size: int) -> tuple[int, int, int]:
    """(top, left, side) of the pixels a view reads: `size * scale`, clipped to the image."""
    side = min(int(round(size * view.scale)), height, width)
    return (*crop_offset(view.crop, height, width, side), side)


def geometry(view: View, side: int, size: int) -> tuple:
    """What decides a view's pixels on `side` x `side` images: equal geometries, equal views."""
    return crop_box(view, side, side, size), view.hflip, view.rot90


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """N x C x h x w -> N x C x size x size, bilinear (antialiased when shrinking), rounded back
    to `x`'s dtype (a weighted mean of pixels: never outside their range)."""
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.round().to(x.dtype)


def apply_view(x: torch.Tensor, size: int, view: View) -> torch.Tensor:
    """One view of N x C x H x W images -> N x C x size x size."""
    top, left, side = crop_box(view, x.shape[-2], x.shape[-1], size)
    out = x[..., top:top + side, left:left + side]
    if side != size:
        out = resize(out, size)
    if view.hflip:
        out = out.flip(-1)
    return torch.rot90(out, view.rot90, dims=(-2, -1)) if view.rot90 else out


def union(view_sets: list[str]) -> tuple[View, ...]:
    """Every distinct view the sets need, in first-use order (auto's five sets share 16 of 26)."""
    return tuple(dict.fromkeys(v for name in view_sets for v in VIEW_SETS[name]))


def merge(proba: torch.Tensor, how: str, simplex: bool = True) -> torch.Tensor:
    """V x N x K view predictions -> N x K: mean, or geometric mean renormalised (rows summing
    to 1 when `simplex`, else each column's probability against its complement)."""
    if how == "mean":
        return proba.mean(0)
    if how == "geometric" and not simplex:
        p = proba.clamp(1e-12, 1 - 1e-12)
        return torch.sigmoid((torch.log(p) - torch.log1p(-p)).mean(0))
    if how == "geometric":
        return F.softmax(torch.log(proba.clamp_min(1e-12)).mean(0), dim=1)
    raise ValueError(f"unknown merge {how!r}")


@functools.lru_cache(maxsize=32)
def gather_index(height: int, width: int, size: int, needed: tuple[View, ...],
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Flat pixel index of every view, V*size*size long: the views (none zoomed) applied to a
    plane of indices; made once per shape, views and device (not copied to the device every
    batch)."""
    plane = torch.arange(height * width).view(1, 1, height, width)
    return torch.cat([apply_view(plane, size, v).flatten() for v in needed]).to(device)


@functools.lru_cache(maxsize=64)
def view_rows(name: str, needed: tuple[View, ...], device: torch.device) -> torch.Tensor:
    """Where view set `name`'s views are in `needed`, as an index on `device`, made once."""
    index = {v: i for i, v in enumerate(needed)}
    return torch.tensor([index[v] for v in VIEW_SETS[name]], device=device)


def stack_views(x: torch.Tensor, size: int, needed: tuple[View, ...]) -> torch.Tensor:
    """N x C x H x W -> (N*V) x C x size x size, image-major: the views that only cut pixels with
    one gather, each zoomed one cut and resized.

    The result is laid out channels-last in memory (a strided view, no further copy).
    """
    n, c, h, w = x.shape
    cut = tuple(v for v in needed if crop_box(v, h, w, size)[2] == size)
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
    stacked = pixels.index_select(1, gather_index(h, w, size, cut, x.device)) if cut else None
    if len(cut) < len(needed):
        views = stacked.view(n, len(cut), size, size, c).unbind(1) if cut else ()
        where = {v: i for i, v in enumerate(cut)}
        stacked = torch.stack([views[where[v]] if v in where else
                               apply_view(x, size, v).permute(0, 2, 3, 1) for v in needed], 1)
    return stacked.reshape(n * len(needed), size, size, c).permute(0, 3, 1, 2)


def predict_sets(model: torch.nn.Module, x: torch.Tensor, size: int, view_sets: list[str],
                 how: str, prep: Callable[[torch.Tensor], torch.Tensor],
                 max_batch: int, task=None) -> dict[str, torch.Tensor]:
    """{view set: N x K predictions} for a batch of cached images: `task`'s (pipeline.core.tasks)
    activation of the logits (default softmax), views merged per image.

    All distinct views of the batch are stacked and go through the model together, in
    forward passes of at most `max_batch` images; `prep` turns a stacked chunk into model
    input (uint8 -> normalised float).
    """
    needed = union(view_sets)
    stacked = stack_views(x, size, needed)
    parts = [model(prep(chunk)) for chunk in stacked.split(max_batch)]
    logits = parts[0] if len(parts) == 1 else torch.cat(parts)
    proba = F.softmax(logits.float(), dim=1) if task is None else task.activate(logits)
    proba = proba.view(x.shape[0], len(needed), -1).transpose(0, 1)
    simplex = task is None or task.simplex
    out = {}
    for name in view_sets:
        if VIEW_SETS[name] == needed:
            out[name] = merge(proba, how, simplex)
        else:
            rows = view_rows(name, needed, proba.device)
            out[name] = merge(proba.index_select(0, rows), how, simplex)
    return out


def average_folds(per_fold: list[np.ndarray]) -> np.ndarray:
    """Mean over folds of N x K test predictions."""
    return np.mean(np.stack(per_fold), axis=0)
