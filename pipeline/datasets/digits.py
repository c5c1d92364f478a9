"""The demo competitions, built from scikit-learn's bundled handwritten digits (1797 images): a
Kaggle-layout folder (PNG images upscaled to 32x32 RGB, train.csv, test images,
sample_submission.csv) and the held-out answers in solution.csv, which the pipeline never
reads. `digits`: 80% of the images to train on; `lowdata`: 5%, about 9 per digit, and a test
set nineteen times larger, where pseudo-labels, distillation and refits have room to help."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.core.artifacts import atomic_path, write_csv
from pipeline.core.errors import UserError

ROOT = Path("data/digits")
TEST_FRACTION = {"digits": 0.2, "lowdata": 0.95}  # competition -> its share of test images


def digit_image(pixels: np.ndarray, side: int = 32) -> Image.Image:
    """8x8 intensities in 0..16 -> side x side RGB (dark ink on white paper)."""
    gray = (255 - pixels.reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((side, side), Image.BICUBIC).convert("RGB")


def build(root: Path = ROOT, seed: int = 0, test_fraction: float = 0.2) -> None:
    if (root / "solution.csv").is_file():
        return
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_test = int(round(len(order) * test_fraction))
    test_rows, train_rows = order[:n_test], order[n_test:]
    ids = [f"img_{i:05d}" for i in range(len(order))]
    for split, rows in (("train", train_rows), ("test", test_rows)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for r in rows:
            with atomic_path(folder / f"{ids[r]}.png") as tmp:
                digit_image(digits.images[r]).save(tmp, format="PNG")
    write_csv(pd.DataFrame({"id": [ids[r] for r in train_rows], "label": digits.target[train_rows]}),
              root / "train.csv")
    shuffled = rng.permutation(test_rows)  # sample_submission order differs from the folder's
    write_csv(pd.DataFrame({"id": [ids[r] for r in shuffled], "label": 0}),
              root / "sample_submission.csv")
    write_csv(pd.DataFrame({"id": [ids[r] for r in shuffled], "label": digits.target[shuffled]}),
              root / "solution.csv")
    print(f"wrote {root}: {len(train_rows)} train, {len(test_rows)} test images", file=sys.stderr)


def held_out_accuracy(submission: Path, solution: Path) -> float:
    sub = pd.read_csv(submission, dtype=str)
    sol = pd.read_csv(solution, dtype=str)
    merged = sol.merge(sub, on="id", suffixes=("_true", "_pred"), validate="one_to_one")
    if len(merged) != len(sol):
        raise UserError(f"{submission}: ids do not match {solution}")
    return float((merged["label_true"] == merged["label_pred"]).mean())
