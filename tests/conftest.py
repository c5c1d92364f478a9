"""Shared fixtures: a tiny Kaggle-layout competition built in a temporary working folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]


def class_image(label: int, rng: np.random.Generator, size: int = 20) -> Image.Image:
    """A noisy image whose dominant colour and a bar position identify its class."""
    arr = rng.integers(0, 60, (size, size, 3)).astype(np.int16) + np.array(COLOURS[label]) // 2
    arr[:, label * size // 4:(label + 1) * size // 4] += 80
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_competition(root: Path, n_classes: int = 3, per_class: int = 8, n_test: int = 6,
                     sample: str = "label", groups: bool = False, seed: int = 0) -> Path:
    """Write train.csv, train/, test/, sample_submission.csv under `root`; returns root."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for c in range(n_classes):
        for j in range(per_class):
            image_id = f"tr{c}{j:03d}"
            class_image(c, rng).save(root / "train" / f"{image_id}.png")
            rows.append(dict(image_id=image_id, target=f"class_{c}", site=f"g{j % 4}"))
    train = pd.DataFrame(rows)
    if not groups:
        train = train.drop(columns="site")
    train.to_csv(root / "train.csv", index=False)
    test_ids = [f"te{i:03d}" for i in range(n_test)]
    for i, image_id in enumerate(test_ids):
        class_image(i % n_classes, rng).save(root / "test" / f"{image_id}.png")
    order = list(reversed(test_ids))  # sample_submission order differs from the folder's
    if sample == "label":
        sub = pd.DataFrame({"image_id": order, "target": "class_0"})
    else:
        sub = pd.DataFrame({"image_id": order, **{f"class_{c}": 0.5 for c in range(n_classes)}})
    sub.to_csv(root / "sample_submission.csv", index=False)
    return root


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


COMPETITION = {
    "name": "tiny",
    "data": {"root": "data/tiny", "id_column": "image_id", "target_column": "target",
             "image_suffix": ".png"},
    "metric": "accuracy",
    "folds": {"n_splits": 2},
    "image_size": 16,
    "seed": 0,
}

EXPERIMENT = {
    "competition": "competition.yaml",
    "model": {"backbone": "lenet5"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003},
    "augment": {"preset": "light"},
}


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    """A working folder with data/tiny, configs/tiny/{competition,lenet5}.yaml; cwd is set to it."""
    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "data" / "tiny")
    write_yaml(tmp_path / "configs/tiny/competition.yaml", COMPETITION)
    write_yaml(tmp_path / "configs/tiny/lenet5.yaml", EXPERIMENT)
    return tmp_path
