"""Datasets over the uint8 image cache, loaders, and on-the-fly normalisation."""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pipeline.models import InputSpec


class CachedImages(Dataset):
    """Rows of a cached uint8 array through an albumentations transform -> CxHxW uint8 tensors.

    The transform is reseeded from (seed, epoch, worker), so the same seed gives the same
    augmented batches for a given number of workers, in every run.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None,
                 transform=None, seed: int = 0):
        self.images, self.rows, self.labels = images, np.asarray(rows), labels
        self.transform, self.seed, self.epoch = transform, seed, 0
        self._seeded_for = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reseed(self) -> None:
        if self.transform is None:
            return
        info = get_worker_info()
        key = (self.epoch, info.id if info else -1)
        if key != self._seeded_for:
            self.transform.set_random_seed(self.seed * 1_000_003 + self.epoch * 997 + key[1] + 1)
            self._seeded_for = key

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        self._reseed()
        img = np.asarray(self.images[self.rows[i]])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        label = -1 if self.labels is None else int(self.labels[i])
        return x, label


def _worker_init(_: int) -> None:
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(dataset: CachedImages, batch_size: int, shuffle: bool, num_workers: int,
                seed: int, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, drop_last=drop_last, worker_init_fn=_worker_init,
                      persistent_workers=False)


def normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 NxCxHxW -> float, scaled to [0, 1] then standardised with the model's mean/std."""
    c = x.shape[1]
    mean = torch.tensor(spec.mean[:c] if len(spec.mean) >= c else spec.mean * c).view(1, -1, 1, 1)
    std = torch.tensor(spec.std[:c] if len(spec.std) >= c else spec.std * c).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std
