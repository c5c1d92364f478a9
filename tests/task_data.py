"""Tiny real-image competitions of every task kind, built from scikit-learn's digits.

Each image is 16 x 16 RGB (digits upscaled 2x), or a 2 x 2 mosaic of 8 x 8 digits for
multi-label. Targets: multiclass the digit (0-4), binary digit >= 5, multilabel the digits of
0-3 present in the mosaic, regression the digit plus noise, ordinal the grade digit // 2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

from conftest import write_yaml

N_TRAIN, N_TEST = 320, 12
SETUPS = {  # task: (metric, sample_submission value column(s), experiment overrides)
    "multiclass": ("accuracy", "label"),
    "binary": ("roc_auc", "target"),
    "multilabel": ("macro_f1", "tags"),
    "regression": ("rmse", "value"),
    "ordinal": ("qwk", "grade"),
}


def _rgb(gray: np.ndarray) -> Image.Image:
    """An 8 x 8 digit (0-16) or 16 x 16 mosaic -> 16 x 16 RGB PNG image."""
    arr = gray if gray.shape[0] == 16 else np.kron(gray, np.ones((2, 2)))
    arr = np.clip(arr * 15, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1))


def _samples(task: str, n: int, rng: np.random.Generator):
    """(images, targets as the train table spells them)."""
    digits = load_digits()
    if task == "multilabel":
        pool = {d: digits.images[digits.target == d] for d in range(4)}
        images, targets = [], []
        for _ in range(n):
            mosaic, present = np.zeros((16, 16)), set()
            for q in range(4):
                if rng.random() < 0.5:
                    d = int(rng.integers(4))
                    present.add(d)
                    r, c = divmod(q, 2)
                    mosaic[8 * r:8 * r + 8, 8 * c:8 * c + 8] = pool[d][rng.integers(len(pool[d]))]
            images.append(mosaic)
            targets.append(" ".join(f"d{d}" for d in sorted(present)))
        return images, targets
    keep = np.flatnonzero(digits.target < 5) if task == "multiclass" else np.arange(len(digits.target))
    rows = rng.choice(keep, n, replace=False)
    y = digits.target[rows]
    targets = {"multiclass": [f"digit{d}" for d in y],
               "binary": ["high" if d >= 5 else "low" for d in y],
               "regression": [f"{d + rng.normal(0, 0.3):.3f}" for d in y],
               "ordinal": [str(d // 2) for d in y]}[task]
    return list(digits.images[rows]), targets


def make_task_competition(workdir: Path, task: str, seed: int = 0, epochs: int = 15) -> Path:
    """data/<task>/ and configs/<task>/{competition,lenet5,ensemble}.yaml under `workdir`."""
    rng = np.random.default_rng(seed)
    root = workdir / "data" / task
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    images, targets = _samples(task, N_TRAIN + N_TEST, rng)
    ids = [f"im{i:04d}" for i in range(len(images))]
    for image_id, img in zip(ids, images):
        folder = "train" if int(image_id[2:]) < N_TRAIN else "test"
        _rgb(img).save(root / folder / f"{image_id}.png")
    pd.DataFrame({"id": ids[:N_TRAIN], "target": targets[:N_TRAIN]}).to_csv(
        root / "train.csv", index=False)
    metric, column = SETUPS[task]
    value = {"binary": 0.5, "regression": 0.5, "ordinal": 0}.get(task, "")
    pd.DataFrame({"id": ids[N_TRAIN:], column: value}).to_csv(root / "sample_submission.csv",
                                                            index=False)
    write_yaml(workdir / f"configs/{task}/competition.yaml", {
        "data": {"root": f"data/{task}", "target_column": "target", "image_suffix": ".png"},
        "task": task, "metric": metric, "folds": {"n_splits": 2}, "image_size": 16, "seed": 0})
    write_yaml(workdir / f"configs/{task}/lenet5.yaml", {
        "competition": "competition.yaml", "model": {"backbone": "lenet5"},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.003},
        "augment": {"preset": "none", "hflip": False}})
    write_yaml(workdir / f"configs/{task}/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["lenet5"], "trials": 5})
    return root
