"""A PNG grid of original vs augmented samples (`make preview`): one row per sampled training
image, its evaluation view (centre crop), what the training data path makes of it in
successive epochs, and (when configured) the same batch after mixup/cutmix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.core import layout
from pipeline.core.artifacts import atomic_path
from pipeline.core.competition import load_competition_data
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.data.augment import eval_transform, mixer, train_transform
from pipeline.data.images import decode, resize
from pipeline.data.loader import CachedImages
from pipeline.models.factory import experiment_input

CELL, GAP, HEADER = 96, 4, 16


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a preview with `rows` images and `cols` columns."""
    return GAP + cols * (CELL + GAP), HEADER + GAP + rows * (CELL + GAP)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)


def sample_views(cfg: ExperimentConfig, n_images: int,
                 n_augmented: int) -> tuple[list[str], np.ndarray]:
    """Column titles and an n_images x columns x C x size x size uint8 array of views."""
    comp = load_competition_data(cfg)
    if len(comp.train) == 0:
        raise UserError(f"{cfg.data.path('train_csv')}: no training images to preview")
    _, side = experiment_input(cfg, comp.task.n_outputs)
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(len(comp.train), min(n_images, len(comp.train)), replace=False))
    paths = comp.train["path"].iloc[rows]
    images = np.stack([resize(decode(p, cfg.data.channels), side) for p in paths])
    labels = comp.y[rows]
    positions = np.arange(len(rows))
    eval_ds = CachedImages(images, positions, labels, eval_transform(cfg.image_size))
    original, _ = eval_ds.batch(positions)
    train_ds = CachedImages(images, positions, labels,
                            train_transform(cfg.augment, cfg.image_size, cfg.seed), cfg.seed)
    augmented = [_to_uint8(train_ds.batch(positions, epoch=e)[0]) for e in range(n_augmented)]
    titles = ["original"] + [f"epoch {e + 1}" for e in range(n_augmented)]
    mix = mixer(cfg.augment, len(comp.classes), 0.0, 2 * (len(rows) // 2)) if len(rows) >= 2 else None
    if mix is not None:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        pairs = augmented[0][: 2 * (len(rows) // 2)].float()
        mixed, _ = comp.task.mix(mix, pairs, torch.from_numpy(labels[: len(pairs)]))
        mixed = torch.cat([_to_uint8(mixed), augmented[0][len(pairs):]])
        augmented.append(mixed)
        titles.append("mixup/cutmix")
    return titles, torch.stack([original, *augmented], 1).numpy()


def render(titles: list[str], views: np.ndarray) -> Image.Image:
    """Tile the views (rows x columns x C x H x W uint8) into one RGB image with column titles."""
    n_rows, n_cols = views.shape[:2]
    canvas = Image.new("RGB", grid_size(n_rows, n_cols), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((GAP + c * (CELL + GAP), 2), title, fill=(0, 0, 0))
    for r in range(n_rows):
        for c in range(n_cols):
            chw = views[r, c]
            rgb = np.repeat(chw, 3, 0) if chw.shape[0] == 1 else chw
            cell = Image.fromarray(rgb.transpose(1, 2, 0)).resize((CELL, CELL), Image.NEAREST)
            canvas.paste(cell, (GAP + c * (CELL + GAP), HEADER + GAP + r * (CELL + GAP)))
    return canvas


def write_preview(cfg: ExperimentConfig, n_images: int = 8, n_augmented: int = 6) -> Path:
    titles, views = sample_views(cfg, n_images, n_augmented)
    out = layout.Run.of(cfg.name, cfg.experiment).preview
    with atomic_path(out) as tmp:
        render(titles, views).save(tmp, format="PNG")
    return out
