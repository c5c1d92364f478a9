"""Batches of the uint8 image cache, augmented a batch at a time, and on-the-fly normalisation.

A loader hands out whole batches: the sampler (in the main process) turns an epoch into
`BatchKey`s, and the dataset gathers a key's rows from the memory-mapped cache and augments
them in one go: in worker processes or a background thread of the main process while the
model trains on the previous batch, or, with no core free for either, in the training thread
between steps. The augmentation's parameters are drawn for whole epochs of slots at once,
from the seed and the epoch alone, and each batch takes its slots' share, so a seed gives the
same batches whatever the number of workers.
"""
from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.batch_augment import (BatchAugment, BatchTransform, Plan, compile_compose,
                                         gather_rows)
from pipeline.models.factory import InputSpec
from pipeline.runtime.cpu import one_openmp_thread, spare_core


PLAN_SLOTS = 1 << 14  # parameters drawn per call: ~0.5 ms a call, then ~0.3 us a slot (light)


@dataclass(frozen=True)
class BatchKey:
    """One batch: positions into the dataset's rows, its epoch and its first slot in the epoch."""

    epoch: int
    start: int
    positions: np.ndarray


class PerImage(BatchTransform):
    """Fallback for pipelines with no batched equivalent: albumentations image by image, seeded
    per batch by its first slot."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def plan(self, n: int, c: int, h: int, w: int, rng: np.random.Generator) -> Plan:
        return Plan([(self.compose, dict(seed=rng.integers(2**31 - 1, size=n)))])

    def apply(self, images: np.ndarray, index: np.ndarray, plan: Plan) -> torch.Tensor:
        self.compose.set_random_seed(int(plan.stages[0][1]["seed"][0]))
        # copies: a transform working in place must not change the shared cache
        out = [self.compose(image=np.array(images[i]))["image"] for i in index]
        out = np.stack([o[:, :, None] if o.ndim == 2 else o for o in out])
        return torch.from_numpy(out).permute(0, 3, 1, 2)


def seeded(*values: int) -> np.random.Generator:
    """A generator determined by the integers given (any sign)."""
    return np.random.default_rng([v % 2**64 for v in values])


def batch_transform(compose: A.Compose | None) -> BatchTransform | None:
    """`compose` run a batch at a time where it compiles, else image by image (None: none)."""
    if compose is None:
        return None
    return compile_compose(compose) or PerImage(compose)


class CachedImages(Dataset):
    """Rows of a cached N x H x W x C uint8 array -> (N x C x h x w batch, targets in their own dtype).

    `transform` is an albumentations Compose (or None for the whole cached image). Batches
    are uint8, or float32 in [0, 255] when a batched transform could not keep uint8 (see
    `BatchAugment`). Indexing takes a `BatchKey` from `make_loader`'s sampler.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray | None,
                 transform: A.Compose | None = None, seed: int = 0, defer: bool = False):
        # a plain view of a memory map: indexing a np.memmap costs a subclass round trip
        self.images, self.rows = np.asarray(images), np.asarray(rows, dtype=np.int64)
        self.targets = None if targets is None else np.asarray(targets)
        self.augment = batch_transform(transform)
        self.seed, self.epoch = seed, 0
        self._plans: dict[int, Plan] = {}
        # defer: leave every stage after reading the cache to the consumer's device
        self.defer = defer and isinstance(self.augment, BatchAugment)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def plan(self, epoch: int, start: int, count: int) -> Plan:
        """The augmentation's parameters for slots `start`.. `start + count - 1` of `epoch`.

        They are drawn for PLAN_SLOTS slots at once, i.e. for a block of epochs of a small
        dataset (one epoch of a large one), from (seed, the block's first epoch); the block
        before or after is kept while the loader of a neighbouring epoch may still ask for it.
        """
        per_block = max(1, PLAN_SLOTS // max(1, len(self)))
        first = epoch - epoch % per_block
        if first not in self._plans:
            _, h, w, c = self.images.shape
            plan = self.augment.plan(per_block * len(self), c, h, w, seeded(self.seed, first))
            self._plans = {e: p for e, p in self._plans.items() if abs(e - first) <= per_block} \
                | {first: plan}
        offset = (epoch - first) * len(self) + start
        return self._plans[first][offset:offset + count]

    def batch(self, positions: np.ndarray, epoch: int = 0, start: int = 0):
        """The rows at `positions` as (N x C x h x w batch, targets), augmented as the slots
        `start`, `start` + 1, ... of `epoch`. With `defer`, (batch read from the cache, targets,
        the rest of the augmentation's plan), for `finish_augment` on the model's device."""
        index = self.rows[positions]
        y = (torch.full((len(positions),), -1, dtype=torch.int64) if self.targets is None
             else torch.from_numpy(self.targets[positions]))
        if self.augment is None:
            return gather_rows(self.images, index), y
        plan = self.plan(epoch, start, len(index))
        if self.defer:
            here, rest = BatchAugment.split(plan)
            return self.augment.apply(self.images, index, here), y, rest
        return self.augment.apply(self.images, index, plan), y

    def __getitem__(self, key: BatchKey):
        return self.batch(key.positions, key.epoch, key.start)


class EpochBatches(Sampler):
    """Keys of one epoch's batches: shuffled by `seed` (fixed per loader), tagged with the
    dataset's epoch when the sampler was made (so a loader made ahead keeps its own epoch).

    With `shard` = (rank, world size), global batch k holds `world * batch_size` slots of one
    permutation, whatever the world size, and rank r takes its r-th `batch_size` slots: the
    ranks' shards are disjoint, and their union is the one-process batch of the same slots.
    `limit` caps the number of batches.
    """

    def __init__(self, dataset: CachedImages, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, shard: tuple[int, int] = (0, 1), limit: int | None = None):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, dataset.epoch
        self.rank, self.world = shard
        self.limit = limit

    def __len__(self) -> int:
        n, size = len(self.dataset), self.batch_size * self.world
        count = n // size if self.drop_last else -(-n // size)
        return count if self.limit is None else min(count, self.limit)

    def __iter__(self):
        n, epoch = len(self.dataset), self.epoch
        order = seeded(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        size = self.batch_size
        for number in range(len(self)):
            start = (number * self.world + self.rank) * size
            yield BatchKey(epoch, start, order[start:start + size])


def worker_init(_: int) -> None:
    """Workers: OpenCV single-threaded and one torch thread each, so they do not oversubscribe."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


class Prefetched:
    """Iterates a loader in a background thread, `depth` batches ahead of the consumer.

    Torch ops release the GIL, so the next batch is gathered and augmented while the model
    trains on this one; the thread's ops run on one OpenMP thread
    (`runtime.cpu.one_openmp_thread`).
    `then`, another Prefetched, starts as soon as this one's last batch is made, so the next
    epoch's first batches are ready when it begins. `close` stops a loader that will not be
    consumed.
    """

    def __init__(self, loader: DataLoader, depth: int = 2):
        self.loader, self.depth = loader, depth
        self.then: Prefetched | None = None
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def start(self) -> None:
        """Start making batches now (iterating starts it otherwise); no-op when running."""
        if self._thread is not None:
            return
        self._queue: queue.Queue = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        one_openmp_thread()
        try:
            for item in self.loader:
                if self._stop.is_set():
                    return
                self._queue.put((item, None))
            self._queue.put((None, None))
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put((None, err))
        if self.then is not None:
            self.then.start()

    def close(self) -> None:
        """Stop the thread, if any, and forget it (iterating again starts afresh)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None

    def __iter__(self):
        self.start()
        try:
            while True:
                item, err = self._queue.get()
                if err is not None:
                    raise err
                if item is None:
                    return
                yield item
        finally:
            self.close()


class EpochLoaders:
    """Per-epoch loaders, each made one epoch ahead: with background-thread loaders the next
    epoch's first batches are made as soon as this epoch's last one is, so no epoch starts
    by waiting. Use as a context manager; a loader made for an epoch that never comes
    (early stopping, the end) is stopped."""

    def __init__(self, make: Callable[[int], DataLoader | Prefetched], n_epochs: int):
        self.make, self.n_epochs = make, n_epochs
        self.ahead: tuple[int, DataLoader | Prefetched] | None = None

    def get(self, epoch: int) -> DataLoader | Prefetched:
        if self.ahead is not None and self.ahead[0] == epoch:
            loader = self.ahead[1]
        else:
            self.close()
            loader = self.make(epoch)
        self.ahead = None
        if epoch + 1 < self.n_epochs:
            self.ahead = (epoch + 1, self.make(epoch + 1))
            if isinstance(loader, Prefetched) and isinstance(self.ahead[1], Prefetched):
                loader.then = self.ahead[1]
        return loader

    def close(self) -> None:
        if self.ahead is not None and isinstance(self.ahead[1], Prefetched):
            self.ahead[1].close()
        self.ahead = None

    def __enter__(self) -> EpochLoaders:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def make_loader(dataset: CachedImages, batch_size: int, shuffle: bool, num_workers: int,
                seed: int, drop_last: bool = False, background: bool | None = None,
                shard: tuple[int, int] = (0, 1), limit: int | None = None,
                pin_memory: bool = False) -> DataLoader | Prefetched:
    """Batches of `dataset`; the same seed and epoch give the same batches for any `num_workers`
    (and, with `shard`, any world size: see `EpochBatches`).

    With `num_workers=0` a background thread prepares the next batches (`Prefetched`) when
    `background` (None: when a core is free for it, `cpu.spare_core`), or the consumer makes
    each batch as it asks; otherwise worker processes do, each prefetching 4 batches.
    `pin_memory`: batches in page-locked memory, for asynchronous copies to a GPU.
    """
    sampler = EpochBatches(dataset, batch_size, shuffle, seed, drop_last, shard, limit)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, pin_memory=pin_memory,
                        num_workers=num_workers, worker_init_fn=worker_init,
                        prefetch_factor=4 if num_workers else None,
                        # its own generator: starting an epoch, possibly in a background thread,
                        # must not draw from the global RNG the model's dropout and mixup use
                        generator=torch.Generator().manual_seed(seed))
    if num_workers or not (spare_core() if background is None else background):
        return loader
    return Prefetched(loader)


def channel_stats(spec: InputSpec, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per input channel: the model's own, or their average for 1-channel input."""
    if channels == len(spec.mean):
        return tuple(spec.mean), tuple(spec.std)
    if channels == 1:
        return (float(np.mean(spec.mean)),), (float(np.mean(spec.std)),)
    raise ValueError(f"cannot normalise {channels} channels with {len(spec.mean)} mean values")


@functools.lru_cache(maxsize=16)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalize`'s 1 x C x 1 x 1 factors on `device`, made once (not copied every batch)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


def normalize(x: torch.Tensor, spec: InputSpec, channels_last: bool = False) -> torch.Tensor:
    """N x C x H x W in [0, 255] (uint8 or float) -> float32 (x / 255 - mean) / std, model stats,
    on `x`'s device."""
    scale, shift = _scale_shift(*channel_stats(spec, x.shape[1]), x.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, memory_format=fmt, device=x.device)
    return torch.addcmul(shift, x, scale, out=out)


class DeviceBatches:
    """A loader's uint8 batches as model input on the runtime's device: copied (from pinned
    memory, without blocking), augmented there when the dataset deferred it, and normalised
    there (a quarter of float32's bytes cross the bus). The next batch is prepared on the
    runtime's input stream while the model runs on this one (as timm's PrefetchLoader does; on
    the CPU the stream is the current one)."""

    def __init__(self, loader, rt, spec: InputSpec, channels_last: bool):
        self.loader, self.rt, self.spec, self.channels_last = loader, rt, spec, channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, x: torch.Tensor, y: torch.Tensor, *deferred: Plan):
        x, y = self.rt.to_device(x, y)
        if deferred:
            x = BatchAugment.run(x, deferred[0])
        return normalize(x, self.spec, self.channels_last), y

    def __iter__(self):
        ready = None
        for item in self.loader:
            with self.rt.input_stream():
                upcoming = self.prepare(*item)
            if ready is not None:
                yield ready
            self.rt.inputs_ready(upcoming)
            ready = upcoming
        if ready is not None:
            yield ready


def to_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """The model in NHWC layout when `channels_last` (fed by `normalize(..., channels_last=True)`)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
