"""Loaders over the cache: batching, seeded reproducibility with workers, normalisation, 1 channel."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from conftest import write_yaml
from pipeline import folds, predict, train
from pipeline.data import loader as data
from pipeline.runtime import cpu
from pipeline.training.experiment import prepare
from pipeline.data.augment import train_transform
from pipeline.core.config import AugmentConfig, load_experiment
from pipeline.data.loader import (CachedImages, EpochLoaders, Prefetched, channel_stats, make_loader,
                           normalize)
from pipeline.models.factory import InputSpec

SPEC = InputSpec((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0)


def _images(n=20, side=14, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, channels), dtype=np.uint8)


def _epoch(ds: CachedImages, epoch: int, workers: int = 0, seed: int = 5, batch: int = 6,
           drop_last: bool = False, background: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds.set_epoch(epoch)
    return list(make_loader(ds, batch, True, workers, seed, drop_last, background))


def test_batches_cover_each_row_once_with_matching_labels():
    images = _images()
    rows = np.arange(3, 20)
    ds = CachedImages(images, rows, rows * 10)
    batches = _epoch(ds, 0)
    assert [len(y) for _, y in batches] == [6, 6, 5]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(y.tolist()) == sorted((rows * 10).tolist()) and y.tolist() != (rows * 10).tolist()
    for xi, yi in zip(x, y):  # each image is the cache row its label names
        np.testing.assert_array_equal(xi.numpy().transpose(1, 2, 0), images[yi.item() // 10])
    assert [len(y) for _, y in _epoch(ds, 0, drop_last=True)] == [6, 6]
    unshuffled = list(make_loader(ds, 6, False, 0, 0))
    assert torch.cat([y for _, y in unshuffled]).tolist() == (rows * 10).tolist()


def _augmented(compose, workers: int, epoch: int = 0, seed: int = 1, background: bool = True):
    ds = CachedImages(_images(), np.arange(20), np.arange(20), compose, seed=seed)
    return torch.cat([x for x, _ in _epoch(ds, epoch, workers, background=background)])


@pytest.mark.parametrize("compose", [
    train_transform(AugmentConfig(preset="heavy"), 12, seed=0),  # batched path
    A.Compose([A.ToGray(p=0.5), A.RandomResizedCrop((12, 12)), A.RGBShift(p=0.5)]),  # per image
], ids=["batched", "per-image"])
def test_same_seed_same_batches_with_any_number_of_workers(compose):
    plain = _augmented(compose, workers=0)
    assert torch.equal(plain, _augmented(compose, workers=0))
    assert torch.equal(plain, _augmented(compose, workers=2))
    assert torch.equal(plain, _augmented(compose, workers=0, background=False))
    assert not torch.equal(plain, _augmented(compose, workers=0, epoch=1))
    assert not torch.equal(plain, _augmented(compose, workers=0, seed=2))
    assert _augmented(compose, workers=0, seed=-3).shape == plain.shape  # any seed works


@pytest.mark.parametrize("slots", [40, 1 << 14])  # 2 epochs of 20 slots per draw; all of them
def test_epochs_augment_alike_however_their_parameters_are_drawn_and_kept(monkeypatch, slots):
    monkeypatch.setattr(data, "PLAN_SLOTS", slots)
    compose = train_transform(AugmentConfig(preset="medium"), 12, seed=0)
    ds = CachedImages(_images(), np.arange(20), np.arange(20), compose, seed=4)
    in_turn = [torch.cat([x for x, _ in _epoch(ds, e)]) for e in range(5)]
    assert len(ds._plans) <= 2  # draws for epochs long gone are dropped
    for e in (3, 0, 4):  # a fresh dataset draws the epoch's block on its own
        fresh = CachedImages(_images(), np.arange(20), np.arange(20), compose, seed=4)
        assert torch.equal(torch.cat([x for x, _ in _epoch(fresh, e)]), in_turn[e])
    assert not any(torch.equal(a, b) for i, a in enumerate(in_turn) for b in in_turn[i + 1:])
    maps = [ds.plan(e, 0, 20).stages[0][1]["m"] for e in range(4)]  # medium: one Warp first
    assert not any(np.array_equal(a, b) for i, a in enumerate(maps) for b in maps[i + 1:])
    np.testing.assert_array_equal(ds.plan(3, 5, 10).stages[0][1]["m"], maps[3][5:15])


class _Failing(CachedImages):
    def batch(self, positions, epoch=0, start=0):
        if start == 8:
            raise ValueError("broken batch 2")
        return super().batch(positions, epoch, start)


def test_loaders_made_an_epoch_ahead_give_the_same_batches_and_unused_ones_stop():
    ds = CachedImages(_images(), np.arange(20), np.arange(20),
                      train_transform(AugmentConfig(preset="heavy"), 12, seed=0), seed=3)

    def loader(epoch: int):
        ds.set_epoch(epoch)
        return make_loader(ds, 6, True, 0, 100 + epoch, background=True)

    def tensors(batches):
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    fresh = [tensors(list(loader(e))) for e in range(3)]
    with EpochLoaders(loader, 3) as loaders:
        ahead = [tensors(list(loaders.get(e))) for e in range(3)]
        assert loaders.ahead is None  # nothing is made beyond the last epoch
    for (x, y), (x_ahead, y_ahead) in zip(fresh, ahead):
        assert torch.equal(x, x_ahead) and torch.equal(y, y_ahead)
    assert not torch.equal(fresh[0][0], fresh[1][0])

    with EpochLoaders(loader, 3) as loaders:
        list(loaders.get(0))  # its last batch starts epoch 1's loader
        skipped = loaders.ahead[1]
        thread = skipped._thread
        assert thread is not None and thread.is_alive()  # two batches made, waiting
        assert torch.equal(tensors(list(loaders.get(2)))[0], fresh[2][0])  # as early stopping does
        assert not thread.is_alive() and skipped._thread is None


def test_background_batches_pass_errors_on_and_stop_cleanly():
    threads = torch.get_num_threads()
    loader = make_loader(_Failing(_images(), np.arange(20), None), 4, False, 0, 0, background=True)
    it = iter(loader)
    assert len(loader) == 5 and next(it)[0].shape == (4, 3, 14, 14)
    with pytest.raises(ValueError, match="broken batch 2"):
        list(it)
    first = next(iter(make_loader(CachedImages(_images(), np.arange(20), None), 2, False, 0, 0,
                                  background=True)))
    assert first[0].shape[0] == 2  # leaving a loader early does not hang
    assert torch.get_num_threads() == threads
    seen = []
    later = threading.Thread(target=lambda: seen.append((torch.ones(10**5).sum(), torch.get_num_threads())))
    later.start()
    later.join()
    assert seen[0][1] == threads  # threads made later still get the process's thread count


@pytest.mark.parametrize("spare", [True, False])
def test_a_background_thread_makes_batches_only_when_a_core_is_free_for_it(monkeypatch, spare):
    monkeypatch.setattr(data, "spare_core", lambda: spare)
    ds = CachedImages(_images(), np.arange(20), np.arange(20))
    assert isinstance(make_loader(ds, 4, False, 0, 0), Prefetched) == spare
    assert isinstance(make_loader(ds, 4, False, 0, 0, background=not spare), Prefetched) != spare
    assert not isinstance(make_loader(ds, 4, False, 1, 0), Prefetched)  # workers make them
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not cpu.spare_core()
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert cpu.spare_core()
    finally:
        torch.set_num_threads(threads)


class _ThreadReport(CachedImages):
    def batch(self, positions, epoch=0, start=0):
        return torch.tensor([cv2.getNumThreads(), torch.get_num_threads()]), torch.zeros(1)


def test_workers_run_opencv_and_torch_single_threaded():
    ds = _ThreadReport(_images(4), np.arange(4), None)
    (threads, _), = list(make_loader(ds, 4, False, 1, 0))
    assert threads.tolist() == [1, 1]


def test_normalize_uses_the_model_statistics():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    assert torch.allclose(normalize(x, SPEC), expected, atol=1e-5)
    cl = normalize(x, SPEC, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, expected, atol=1e-5)


def test_normalize_makes_its_factors_once_per_device_with_the_same_result(monkeypatch):
    """The per-channel scale and shift are built once per (statistics, device), not per batch
    (on a GPU each was a host-to-device copy); the output is bit for bit the formula's."""
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    first = normalize(x, SPEC)
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    again = normalize(x, SPEC, channels_last=True)
    monkeypatch.undo()
    assert made == []
    scale = torch.tensor([1.0 / (255.0 * s) for s in SPEC.std]).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(SPEC.mean, SPEC.std)]).view(1, -1, 1, 1)
    assert torch.equal(first, torch.addcmul(shift, x, scale)) and torch.equal(first, again)


def test_one_channel_is_normalised_with_the_averaged_statistics():
    (mean,), (std,) = channel_stats(SPEC, 1)
    assert mean == pytest.approx(0.449) and std == pytest.approx(0.226)
    x = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, SPEC), torch.full((1, 1, 2, 2), (1 - 0.449) / 0.226), atol=1e-4)
    with pytest.raises(ValueError, match="cannot normalise 2 channels"):
        normalize(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), SPEC)


def test_grayscale_channels_last_competition_runs_end_to_end(tiny):
    write_yaml(tiny / "configs/tiny/gray.yaml", {
        "competition": "competition.yaml", "data": {"channels": 1},
        "model": {"backbone": "lenet5"},
        "train": {"epochs": 15, "batch_size": 4, "lr": 0.003, "channels_last": True},
        "augment": {"preset": "heavy", "cutmix_alpha": 1.0}, "tta": {"views": "hflip"}})
    folds.main(["configs/tiny/competition.yaml"])
    train.main(["configs/tiny/gray.yaml"])
    predict.main(["configs/tiny/gray.yaml"])
    cfg = load_experiment("configs/tiny/gray.yaml")
    s = prepare(cfg)
    assert s.images.shape[1:] == (16, 16, 1)
    model = s.fold_model(0).module
    first, *_, last = (m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    assert last.weight.is_contiguous(memory_format=torch.channels_last)
    assert not last.weight.is_contiguous()
    scores = json.loads(s.run.scores.read_text())
    # it learns from one channel: three classes, the prior scores 1/3
    assert scores["cv"] > scores["baseline_cv"] + 0.3 and "cv_tta" in scores


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_glibc_takes_the_allocator_settings():
    assert cpu.reuse_freed_memory()  # False if glibc rejected a value (e.g. a threshold too high)
