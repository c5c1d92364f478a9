"""What the auto mode measures before it plans: the data (image count and size, the task), the
device, and each candidate's real speed at each image size (a few timed training and
prediction steps on random pixels through the pipeline's own training loop and inference path)."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.competition import Competition
from pipeline.core.config import ExperimentConfig
from pipeline.data.images import decode, resize
from pipeline.models import finetune
from pipeline.models.factory import experiment_input
from pipeline.models.predictor import FoldModel
from pipeline.runtime.device import Runtime
from pipeline.training.experiment import Experiment
from pipeline.training.loop import FoldData, LoopState, epoch_loader, start_fold, train_dataset, \
    train_epoch

SAMPLE_IMAGES = 16  # decoded to learn the images' size and decode time
MAX_STEPS = 30  # training steps timed per candidate and size, at most


@dataclass(frozen=True)
class Profile:
    """The competition and machine the plan is for."""

    device: str  # e.g. "cuda:0 (NVIDIA H200)"
    device_type: str  # cpu | cuda
    task: str
    n_train: int
    n_test: int
    folds: int
    side: int  # the train images' median side (the mean of height and width)
    decode_seconds: float  # per image, decoded and resized into a cache (one core)


@dataclass(frozen=True)
class Speed:
    """A candidate at one image size on this machine."""

    train_ips: float  # training images per second
    predict_ips: float  # predicted images (one view) per second
    setup_seconds: float  # building a fold: model (its weights), optimizer, data
    seconds: float  # what measuring it took


def profile(comp: Competition, folds: int, rt: Runtime) -> Profile:
    """The data's size and the device, from a sample of the train images."""
    paths = list(comp.train["path"].iloc[np.linspace(0, len(comp.train) - 1, SAMPLE_IMAGES,
                                                     dtype=int)].unique())
    started, sides = time.perf_counter(), []
    for path in paths:
        img = decode(path, 3)
        sides.append((img.shape[0] + img.shape[1]) / 2)
        resize(img, 64)
    return Profile(rt.device_name(), rt.device.type, comp.task.kind, len(comp.train),
                   len(comp.test), folds, int(np.median(sides)),
                   (time.perf_counter() - started) / len(paths))


def speed(cfg: ExperimentConfig, comp: Competition, rt: Runtime) -> Speed:
    """Time training steps (the groups of the last fine-tuning stage training, usually the
    dearest) and predictions, after a warm-up step each: as many steps as about half a second
    holds (3 to MAX_STEPS)."""
    started = time.perf_counter()
    spec, side = experiment_input(cfg, comp.task.n_outputs)
    batch = cfg.train.batch_size
    rng = np.random.default_rng(0)
    m = min(len(comp.y), batch * MAX_STEPS)
    images = rng.integers(0, 256, (m, side, side, cfg.data.channels), dtype=np.uint8)
    exp = Experiment(cfg, dataclasses.replace(comp, y=comp.y[:m]), np.zeros(m, np.int64), images,
                     side, spec, "measure", rt)
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        f = start_fold(exp, 0, Path(tmp), FoldData(images, np.arange(m), None, np.arange(m)))
        setup = time.perf_counter() - built
        f.model.train()
        finetune.apply_freeze(f.model, f.groups, f.plan[-1].trainable)

        def train(steps: int) -> float:
            rows = np.arange(batch * steps) % m
            loader = epoch_loader(exp, train_dataset(exp, 0, rows), 0, steps)
            timed = time.perf_counter()
            train_epoch(f, LoopState(), loader, [1.0] * steps, 0)
            rt.synchronize()
            return time.perf_counter() - timed

        steps = int(np.clip(0.5 / train(1), 3, MAX_STEPS))
        train_ips = batch * steps / train(steps)
        model = FoldModel(f.model, f.task)
        exp.predict_plain(model, np.arange(min(m, batch)))
        timed, predicted = time.perf_counter(), 0
        while predicted == 0 or time.perf_counter() - timed < 0.3:
            exp.predict_plain(model, np.arange(m))
            predicted += m
        predict_ips = predicted / (time.perf_counter() - timed)
    return Speed(train_ips, predict_ips, setup, time.perf_counter() - started)
