"""The one inference path: fold models and uint8 image batches -> per-view-set predictions.

Training's validation pass, `make predict` (OOF rows and the test set, from the image cache)
and `infer` (a package and streamed test images) all call `predict_batches` with a
`PredictSpec`, the same batch composition and the same model loading, so their predictions
cannot drift apart.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.core import tasks
from pipeline.core.artifacts import atomic_path
from pipeline.core.config import ExperimentConfig, ModelConfig
from pipeline.data.loader import normalize, to_memory_format
from pipeline.models import tta
from pipeline.models.factory import InputSpec, cache_size, create_model
from pipeline.runtime.device import Runtime


@dataclass(frozen=True)
class PredictSpec:
    """Everything besides the weights that decides one experiment's predictions."""

    model: dict  # ModelConfig fields; the architecture is rebuilt from them without weights
    task: tasks.Task  # the competition's: head size, columns, how views merge
    channels: int
    image_size: int
    spec: InputSpec
    channels_last: bool
    view_sets: tuple[str, ...]
    merge: str
    max_batch: int  # most view images in one forward pass
    precision: str = "auto"  # train.precision: the autocast of predictions, resolved per device

    @property
    def side(self) -> int:
        """Side of the resized image the views are cut from."""
        return cache_size(self.image_size, self.spec.crop_pct)

    @property
    def images_per_batch(self) -> int:
        """Images per batch: as many as fit `max_batch` views, so their views go through together."""
        return max(1, self.max_batch // len(tta.union(list(self.view_sets))))

    def to_json(self) -> dict:
        return dict(model=self.model, task=self.task.to_json(), channels=self.channels,
                    image_size=self.image_size, mean=list(self.spec.mean),
                    std=list(self.spec.std), crop_pct=self.spec.crop_pct,
                    channels_last=self.channels_last, view_sets=list(self.view_sets),
                    merge=self.merge, max_batch=self.max_batch, precision=self.precision)

    @classmethod
    def from_json(cls, d: dict) -> PredictSpec:
        spec = InputSpec(tuple(d["mean"]), tuple(d["std"]), float(d["crop_pct"]))
        return cls(dict(d["model"]), tasks.from_json(d["task"]), int(d["channels"]),
                   int(d["image_size"]), spec, bool(d["channels_last"]), tuple(d["view_sets"]),
                   d["merge"], int(d["max_batch"]), d.get("precision", "auto"))


def experiment_spec(cfg: ExperimentConfig, spec: InputSpec, task: tasks.Task,
                    view_sets: list[str]) -> PredictSpec:
    """How an experiment (its model's input `spec`) predicts `view_sets`."""
    model = cfg.model.model_copy(update={"pretrained": False}).model_dump()
    return PredictSpec(model, task, cfg.data.channels, cfg.image_size, spec,
                       cfg.train.channels_last, tuple(view_sets), cfg.tta.merge,
                       cfg.tta.max_batch or cfg.train.eval_batch_size, cfg.train.precision)


@dataclass(frozen=True)
class FoldModel:
    """A fold's model and its fold's task (fitted on the fold's training rows: how the model's
    outputs read, e.g. the range a regression target was scaled by)."""

    module: torch.nn.Module
    task: tasks.Task


def save_checkpoint(path: Path, model: torch.nn.Module, task: tasks.Task) -> None:
    """A fold's weights in safetensors, its fold's task in the file's metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"task": json.dumps(task.to_json())})


def checkpoint_task(path: Path) -> tasks.Task:
    """The fold's task a checkpoint was trained with."""
    with safe_open(str(path), "pt") as f:
        return tasks.from_json(json.loads(f.metadata()["task"]))


def save_weights(src: Path, dst: Path, half: bool) -> None:
    """Copy a checkpoint (its metadata too), its floating tensors stored as float16 when `half`."""
    state = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint with float16 tensors (a half-precision package) back in float32."""
    state = load_file(str(path))
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}


def load_model(ps: PredictSpec, path: Path, on: torch.device | None = None) -> FoldModel:
    """The fold model of `ps` with the checkpoint at `path`, in eval mode, on `on` (CPU)."""
    cfg = ModelConfig(**{**ps.model, "pretrained": False})
    model = create_model(cfg, ps.task.n_outputs, ps.channels)
    model.load_state_dict(load_weights(path))
    model = to_memory_format(model, ps.channels_last).eval()
    return FoldModel(model.to(on) if on is not None else model, checkpoint_task(path))


def predict_batches(models: list[FoldModel], batches: Iterable[torch.Tensor],
                    ps: PredictSpec, rt: Runtime | None = None) -> dict[str, list[np.ndarray]]:
    """{view set: one N x K float64 prediction array per model} for uint8 N x C x H x W batches.

    Every model sees every batch: the images are read once for all of them. A batch moves to
    the runtime's device (default the CPU, fp32) as uint8; views are cut and normalised there,
    and the models run under its autocast (predictions in float32).
    """
    rt = rt or Runtime(torch.device("cpu"))
    prep = functools.partial(normalize, spec=ps.spec, channels_last=ps.channels_last)
    views = list(ps.view_sets)
    out: dict[str, list[list[torch.Tensor]]] = {v: [[] for _ in models] for v in views}
    with torch.inference_mode(), rt.autocast():
        for x in batches:
            x, = rt.to_device(x)
            for i, model in enumerate(models):
                sets = tta.predict_sets(model.module, x, ps.image_size, views, ps.merge, prep,
                                        ps.max_batch, model.task)
                for v, p in sets.items():
                    out[v][i].append(p.cpu())
    return {v: [ps.task.finish(torch.cat(parts).numpy()) for parts in per_model]
            for v, per_model in out.items()}
