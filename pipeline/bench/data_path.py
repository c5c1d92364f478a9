"""Data-path throughput: does loading and augmentation starve the model?

Per demo experiment (configs/digits/*.yaml; models built untrained, every layer trainable):
- real: the train stage's epoch, `train_epoch` (pipeline.training.loop) over fold 0's loader
  exactly as `train_fold` builds it (memory-mapped cache, the experiment's augmentation, batch
  size, workers, mixup), normalisation and the model's optimizer step;
- synthetic: the same `train_epoch` and model over in-memory random uint8 batches of the
  same shape (so only the loader and augmentation differ).
After a warm-up, each repetition runs real and synthetic back to back, alternating which goes
first, so load from other processes hits both alike. Reported: median images/s of each, the
median of the per-repetition ratios (target >= 0.90), and the cache's effect: a cold first
epoch (decode + resize every image into a fresh cache, then train) against a warm epoch. Also
the random-batch step's speed in channels_last over NCHW layout, to choose
`train.channels_last`. On a busy machine (load average above the core count) and with
OMP_WAIT_POLICY unset, it measures in a child process with OMP_WAIT_POLICY=PASSIVE (see main).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import CONFIGS, ensure_demo_inputs, experiment_configs
from pipeline.core.config import ExperimentConfig, load_experiment
from pipeline.data.augment import train_transform
from pipeline.data.loader import EpochLoaders, PerImage, normalize
from pipeline.models import finetune
from pipeline.runtime.cpu import spare_core
from pipeline.training.experiment import Experiment, prepare
from pipeline.training.loop import (Fold, LoopState, build_optimizer, epoch_loader, init_model,
                                    make_mixer, steps_per_epoch, train_dataset, train_epoch)

TARGET = 0.90
MAX_REPS, MIN_REPS = 9, 3  # interleaved repetitions, as many as fit BUDGET_S per experiment
MIN_SECONDS, BUDGET_S = 1.0, 60.0  # each measurement runs whole epochs for >= MIN_SECONDS
FOLD = 0


class Arm:
    """One side of the comparison: a callable running one epoch, and its batch count."""

    def __init__(self, fold: Fold, batches, close=lambda: None):
        self.fold, self.exp = fold, fold.exp  # its model, optimizer and mixer
        self.batches = batches  # () -> iterable of (uint8 x, y)
        self.close = close  # stops what the arm left running (a loader made ahead)
        self.state = LoopState()

    def epoch(self) -> int:
        """Run one epoch; returns the number of images it trained on."""
        loader = self.batches()
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar, alike in both arms
            train_epoch(self.fold, self.state, loader, [1.0] * len(loader), 0, "bench")
        return len(loader) * self.exp.cfg.train.batch_size

    def rate(self, epochs: int) -> float:
        start, images = time.perf_counter(), 0
        for _ in range(epochs):
            images += self.epoch()
        self.exp.rt.synchronize()
        return images / (time.perf_counter() - start)


def real_loader(exp: Experiment, rows: np.ndarray, per_image: bool = False):
    """Fold 0's training loaders, made as `train_fold` makes them, one new epoch per call.

    `per_image` swaps the batched augmentation for albumentations image by image (the path
    custom lists with unbatched transforms take), to show what batching buys. Also returns
    the function that stops the loader made ahead.
    """
    ds = train_dataset(exp, FOLD, rows)
    if per_image:
        ds.augment = PerImage(train_transform(exp.cfg.augment, exp.cfg.image_size, exp.cfg.seed))
    loaders = EpochLoaders(lambda e: epoch_loader(exp, ds, FOLD, e), 10**9)
    epoch = iter(range(10**9))
    return (lambda: loaders.get(next(epoch))), loaders.close


def interleaved_rates(a: Arm, b: Arm, epochs: int, reps: int) -> tuple[list[float], list[float]]:
    """Rates of `a` and `b` over `reps` repetitions, alternating which runs first."""
    rates_a, rates_b = [], []
    for rep in range(reps):
        pairs = [(a, rates_a), (b, rates_b)]
        for arm, rates in pairs if rep % 2 == 0 else pairs[::-1]:
            rates.append(arm.rate(epochs))
    return rates_a, rates_b


def synthetic_loader(exp: Experiment, n_batches: int):
    """`n_batches` random uint8 batches and labels in the device's memory, cycling through four."""
    cfg = exp.cfg
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.data.channels, cfg.image_size, cfg.image_size)
    pool = [exp.rt.to_device(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen),
                             torch.randint(0, len(exp.comp.classes), shape[:1], generator=gen))
            for _ in range(4)]
    data = [pool[i % len(pool)] for i in range(n_batches)]
    return lambda: data


def setup(cfg: ExperimentConfig) -> tuple[Experiment, float]:
    start = time.perf_counter()
    exp = prepare(cfg)
    return exp, time.perf_counter() - start


def with_layout(exp: Experiment, channels_last: bool) -> Experiment:
    layout = exp.cfg.train.model_copy(update={"channels_last": channels_last})
    cfg = exp.cfg.model_copy(update={"train": layout})
    return dataclasses.replace(exp, cfg=cfg)


def channels_last_speedup(exp: Experiment, n_batches: int, epochs: int, reps: int) -> float:
    """Synthetic-step images/s in NHWC over NCHW layout (median of interleaved repetitions)."""
    arms = []
    for channels_last in (False, True):
        in_layout = with_layout(exp, channels_last)
        arms.append(Arm(bench_fold(in_layout), synthetic_loader(exp, n_batches)))
        arms[-1].rate(1)  # warm-up
    nchw, nhwc = interleaved_rates(*arms, epochs, reps)
    return statistics.median(b / a for a, b in zip(nchw, nhwc))


def fold_arms(cfg: ExperimentConfig, per_image: bool = False):
    """Fold 0's experiment and rows, and its real and synthetic arms sharing one model and
    optimizer."""
    exp, _ = setup(cfg)
    rows = np.flatnonzero(exp.folds != FOLD)
    fold = bench_fold(exp)
    real = Arm(fold, *real_loader(exp, rows, per_image))
    n_batches = steps_per_epoch(len(rows), cfg.train.batch_size)  # a real epoch's
    synthetic = Arm(fold, synthetic_loader(exp, n_batches))
    return exp, rows, real, synthetic


def per_image_ratio(path: Path) -> float:
    """The data-path ratio with albumentations applied image by image instead of batched."""
    _, _, slow, synthetic = fold_arms(load_experiment(path, ["model.pretrained=false"]), True)
    slow.rate(1), synthetic.rate(1)  # warm-up
    slow_rates, synth_rates = interleaved_rates(slow, synthetic, 1, MIN_REPS)
    slow.close()
    return statistics.median(a / b for a, b in zip(slow_rates, synth_rates))


def bench_fold(exp: Experiment) -> Fold:
    """Fold 0's model (every layer training), AdamW over its layer groups and mixer, as
    `train_fold` builds them."""
    model = init_model(exp, FOLD).train()
    groups = finetune.layer_groups(model)
    rows = np.flatnonzero(exp.folds != FOLD)
    task = exp.comp.task.fit(exp.comp.y[rows])
    return Fold(exp, FOLD, Path(), task, model, groups, [], build_optimizer(exp.cfg, model, groups),
                None, exp.rt.grad_scaler(), make_mixer(exp.cfg, len(exp.comp.classes)),
                train_dataset(exp, FOLD, rows), np.flatnonzero(exp.folds == FOLD),
                steps_per_epoch(len(rows), exp.cfg.train.batch_size))


def cold_and_warm(path: Path, rows: np.ndarray) -> dict:
    """First epoch on a fresh cache (decode + resize all images, then train) vs opening it again."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cfg = load_experiment(path, ["model.pretrained=false", f"data.cache_dir={tmp}"])
        exp, build = setup(cfg)
        arm = Arm(bench_fold(exp), *real_loader(exp, rows))
        start = time.perf_counter()
        arm.epoch()
        first = build + time.perf_counter() - start
        arm.close()
        _, reopen = setup(cfg)
    return dict(cache_build_s=build, first_epoch_s=first, cache_open_s=reopen)


def bench_experiment(path: Path) -> dict:
    cfg = load_experiment(path, ["model.pretrained=false"])
    exp, rows, real, synthetic = fold_arms(cfg)
    n_batches = len(synthetic.batches())
    cache = cold_and_warm(path, rows)

    images = n_batches * cfg.train.batch_size
    epoch_s = images / min(real.rate(1), synthetic.rate(1))  # also the warm-up
    epochs = max(1, math.ceil(MIN_SECONDS / epoch_s))
    reps = max(MIN_REPS, min(MAX_REPS, int(BUDGET_S / (2 * epochs * epoch_s))))
    real_rates, synth_rates = interleaved_rates(real, synthetic, epochs, reps)
    real.close()
    ratios = [r / q for r, q in zip(real_rates, synth_rates)]
    later = images / statistics.median(real_rates)
    nhwc = channels_last_speedup(exp, min(n_batches, 6), epochs, MIN_REPS)
    return dict(experiment=cfg.experiment, model=cfg.model.backbone, size=cfg.image_size,
                side=exp.side, preset="custom" if cfg.augment.custom else cfg.augment.preset,
                loader=loader_kind(cfg.train.num_workers), batch=cfg.train.batch_size,
                epochs=epochs, reps=reps,
                real=statistics.median(real_rates), synthetic=statistics.median(synth_rates),
                ratio=statistics.median(ratios), later_epoch_s=later,
                normalize_us=normalize_cost(synthetic.batches()[0][0], exp.spec),
                channels_last=cfg.train.channels_last, nhwc_speedup=nhwc, **cache)


def loader_kind(workers: int) -> str:
    """Who makes the batches: worker processes, a background thread or the training thread."""
    return f"{workers} proc" if workers else "thread" if spare_core() else "main"


def normalize_cost(x: torch.Tensor, spec) -> float:
    """Microseconds to normalise one batch (part of both arms)."""
    start = time.perf_counter()
    for _ in range(50):
        normalize(x, spec)
    return (time.perf_counter() - start) / 50 * 1e6


def machine() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} cores, load average {load}, torch {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


COLUMNS = (  # title, width, cell
    ("experiment", -12, lambda r: r["experiment"]),
    ("model", -21, lambda r: r["model"]),
    ("px", 7, lambda r: f"{r['side']}>{r['size']}"),
    ("preset", -6, lambda r: r["preset"]),
    ("loader", -6, lambda r: r["loader"]),
    ("n", 2, lambda r: r["reps"]),
    ("real/s", 7, lambda r: f"{r['real']:.0f}"),
    ("random/s", 8, lambda r: f"{r['synthetic']:.0f}"),
    ("ratio", 5, lambda r: f"{r['ratio']:.3f}"),
    ("cache build", 11, lambda r: f"{r['cache_build_s']:.2f}s"),
    ("1st epoch", 9, lambda r: f"{r['first_epoch_s']:.2f}s"),
    ("later", 6, lambda r: f"{r['later_epoch_s']:.2f}s"),
    ("reopen", 6, lambda r: f"{r['cache_open_s']:.2f}s"),
    ("norm", 6, lambda r: f"{r['normalize_us']:.0f}us"),
    ("NHWC", 6, lambda r: f"{r['nhwc_speedup']:.2f}x" + ("*" if r["channels_last"] else "")),
    ("", -12, lambda r: "ok" if r["ratio"] >= TARGET else "BELOW TARGET"),
)
LEGEND = ("px = cached side > training size; loader = who makes the batches: DataLoader worker "
          "processes, or with train.num_workers 0 a background thread (when a core is free for it) "
          "or the training thread between steps (main); "
          "n = repetitions; 1st epoch = building a fresh cache + the first epoch; later = a warm "
          "epoch; reopen = preparing with the cache built; norm = normalising one batch (both "
          "arms); NHWC = the random-batch step's speed in channels_last over NCHW (* = the config "
          "sets train.channels_last)")


def line(cells) -> str:
    """One table row: negative widths align left."""
    padded = (f"{c!s:{'<' if w < 0 else '>'}{abs(w)}}" for c, (_, w, _) in zip(cells, COLUMNS))
    return ("  " + " ".join(padded)).rstrip()


def measure() -> list[dict]:
    """Benchmark every demo experiment, printing a table row as each finishes."""
    print(f"Data path: train-stage images/s vs the same step on in-memory random batches "
          f"(medians of {MIN_REPS}-{MAX_REPS} interleaved repetitions), target ratio >= {TARGET:.2f}")
    print(f"  machine: {machine()}")
    print(line(title for title, _, _ in COLUMNS))
    results = []
    for path in experiment_configs():
        results.append(bench_experiment(path))
        print(line(cell(results[-1]) for _, _, cell in COLUMNS), flush=True)
    print(textwrap.fill(LEGEND, 100, initial_indent="  ", subsequent_indent="  "))
    hungriest = max(results, key=lambda r: r["synthetic"])
    if hungriest["preset"] != "none":
        slow = per_image_ratio(CONFIGS / f"{hungriest['experiment']}.yaml")
        print(f"  {hungriest['experiment']} with albumentations image by image instead of batched "
              f"(the fallback for custom lists): ratio {slow:.3f} (batched: {hungriest['ratio']:.3f})")
    faster = [f"{r['experiment']} (x{r['nhwc_speedup']:.2f})" for r in results
              if r["nhwc_speedup"] > 1.1 and not r["channels_last"]]
    if faster:
        print(f"  channels_last measured faster for {', '.join(faster)}: "
              f"set train.channels_last: true")
    print(f"  machine after: {machine()}")
    return results


def main() -> None:
    """Measure here, or on a busy machine in a child process whose OpenMP threads sleep.

    Spinning OpenMP threads (the default) stall whenever another process holds their core;
    with more runnable processes than cores a 2-thread LeNet step then takes a second instead
    of milliseconds, in both arms alike, and the ratio is noise. An explicit OMP_WAIT_POLICY
    is always respected.
    """
    ensure_demo_inputs()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if "OMP_WAIT_POLICY" in os.environ or load <= cores:
        measure()
        return
    print(f"Data path: load average {load:.1f} on {cores} cores: measuring in a child process "
          f"with OMP_WAIT_POLICY=PASSIVE (set OMP_WAIT_POLICY to choose)", flush=True)
    subprocess.run([sys.executable, "-m", "pipeline.bench.data_path"], check=True,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


if __name__ == "__main__":
    main()
