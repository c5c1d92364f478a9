"""Predicting from an inference package alone (the offline path of `infer`): the verified
package, the sample submission's ids in its layout, and every experiment's test predictions
through the one inference path (images decoded once per distinct input size), blended (or
stacked) as the ensemble stage blends.

Imports nothing it does not need: no training code, no optuna, no plotting.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.blending import blend, stack
from pipeline.core import layout, tasks
from pipeline.core.artifacts import as_written
from pipeline.core.competition import read_table
from pipeline.core.errors import UserError
from pipeline.core.submission import SubmissionFormat
from pipeline.data.images import image_cache
from pipeline.data.loader import CachedImages, make_loader
from pipeline.models import tta
from pipeline.models.predictor import PredictSpec, load_model, predict_batches
from pipeline.packaging.manifest import verify, versions
from pipeline.runtime.device import Runtime

@dataclass(frozen=True)
class LoadedPackage:
    files: layout.Package
    meta: dict  # package.json
    blend: dict  # blend.json
    specs: dict[str, PredictSpec]  # per experiment
    models: dict[str, list[str]]  # per experiment: its test models (fold<k>, refit<seed>)


def load_package(root: Path, max_batch: int | None = None) -> LoadedPackage:
    """A verified package; `max_batch` overrides every experiment's views per forward pass."""
    files = layout.Package(root)
    built, here = verify(files)["versions"], versions()
    differ = [f"{k} {built[k]} (here {here[k]})" for k in ("torch", "timm") if built[k] != here[k]]
    if differ:
        print(f"warning: package built with {', '.join(differ)}", file=sys.stderr)
    mix = json.loads(files.blend.read_text())
    specs, models = {}, {}
    for name in mix["experiments"]:
        settings = json.loads(files.settings(name).read_text())
        ps = PredictSpec.from_json(settings)
        specs[name] = dataclasses.replace(ps, max_batch=max_batch) if max_batch else ps
        models[name] = settings["models"]
    return LoadedPackage(files, json.loads(files.meta.read_text()), mix, specs, models)


def read_sample(path: Path, pkg: LoadedPackage) -> SubmissionFormat:
    """The sample submission's ids and order, in the layout the package was built for."""
    sample = read_table(path)
    sub = pkg.meta["submission"]
    if list(sample.columns) != [sub["id_column"], *sub["columns"]]:
        raise UserError(f"{path}: columns {list(sample.columns)} differ from the competition's "
                        f"{[sub['id_column'], *sub['columns']]}")
    ids = sample[sub["id_column"]]
    if ids.empty:
        raise UserError(f"{path}: has no rows")
    dup = ids.str.strip().duplicated()
    if dup.any():
        raise UserError(f"{path}: duplicate id {ids[dup].iloc[0]!r}")
    return SubmissionFormat(sub["id_column"], sub["format"], tuple(sub["columns"]), tuple(ids),
                            sub["positive_class"], sub["binary_columns"], sub["decided"])


@dataclass
class Timing:
    load_s: float = 0.0  # reading the models' weights
    predict_s: float = 0.0  # decoding, views, models


def by_input(pkg: LoadedPackage) -> dict[tuple[int, int], list[str]]:
    """The experiments grouped by the images they read: {(side, channels): names}."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in pkg.blend["experiments"]:
        ps = pkg.specs[name]
        groups.setdefault((ps.side, ps.channels), []).append(name)
    return groups


def predict_package(pkg: LoadedPackage, paths: list[str], on: torch.device,
                    timing: Timing, bar: tqdm | None = None) -> list[np.ndarray]:
    """Each experiment's test predictions, averaged over its test models (rows in `paths` order).

    The images are decoded and resized once per distinct input (side, channels) into a
    temporary uint8 cache, as the predict stage's, and every experiment reading that input
    takes its batches from it (a code competition's time limit counts every decode)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="infer-cache-") as folder:
        for (side, channels), names in by_input(pkg).items():
            started = time.perf_counter()
            images = image_cache(paths, side, channels, folder)
            timing.predict_s += time.perf_counter() - started
            for name in names:
                ps, rt = pkg.specs[name], Runtime.on(on, pkg.specs[name].precision)
                started = time.perf_counter()
                models = [load_model(ps, pkg.files.weights(name, m), on)
                          for m in pkg.models[name]]
                timing.load_s += time.perf_counter() - started
                started = time.perf_counter()
                loader = make_loader(CachedImages(images, np.arange(len(paths)), None),
                                     ps.images_per_batch, False, 0, 0, **rt.loader_options())
                batches = (x for x, _ in loader)
                if bar is not None:
                    batches = _counted(batches, bar, name)
                predicted = predict_batches(models, batches, ps, rt)
                out[name] = tta.average_folds(predicted[ps.view_sets[0]])
                timing.predict_s += time.perf_counter() - started
    return [out[name] for name in pkg.blend["experiments"]]


def _counted(batches: Iterator[torch.Tensor], bar: tqdm, name: str) -> Iterator[torch.Tensor]:
    bar.set_postfix_str(name)
    for x in batches:
        yield x
        bar.update(len(x))


def blended(pkg: LoadedPackage, per_experiment: list[np.ndarray]) -> np.ndarray:
    """The blend (or the stack's meta-model) of the experiments' predictions, through the same
    numbers as the stages' files: each experiment's as predict writes it, the blend as the
    ensemble stage writes it."""
    probas = np.stack([as_written(p) for p in per_experiment])
    task = tasks.from_json(pkg.meta["task_spec"])
    return as_written(blend.blend(probas, np.asarray(pkg.blend["weights"]), pkg.blend["mode"], task,
                                  meta=stack.from_json(pkg.blend.get("stack"))))


def estimate(pkg: LoadedPackage, paths: list[str], n: int, on: torch.device) -> str:
    """How long `n` images would take: the time to load the models' weights, plus `n` times the
    per-image time measured on a sample of one full batch (per image, a smaller batch can take
    twice as long), in a second pass over it (the first warms up the kernels)."""
    sample = paths[:max(ps.images_per_batch for ps in pkg.specs.values())]
    predict_package(pkg, sample, on, Timing())
    timing = Timing()
    predict_package(pkg, sample, on, timing)
    per_image = timing.predict_s / len(sample)
    total = timing.load_s + n * per_image
    return (f"estimate: {n} images would take about {total:.1f} s ({total / 60:.1f} min) on "
            f"{on.type}: {1 / per_image:.1f} images/s measured on {len(sample)} images, "
            f"{timing.load_s:.1f} s to load the weights")
