"""Checkpoint averaging (`train.average`): the weights of several epochs of one fold averaged.

While a fold trains, each epoch's weights are kept as epoch<e>.safetensors while they are
candidates: the last k epochs (`of: last`, SWA-like), or the k best by validation score
(`best`, and `greedy`: a greedy soup adds them best first while the validation score does not
drop). When the fold's stages are done, the candidates are averaged, BatchNorm statistics are
recomputed on the fold's training images (averaged weights do not fit the averaged running
statistics), and the average replaces best.safetensors when it scores at least as well on the
validation rows as the best epoch (a choice on those rows, as the best epoch's is), or always
where the fold chooses nothing on them (`train.keep: last`, a refit); average.json records it.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core import layout, metrics
from pipeline.core.artifacts import write_json
from pipeline.data.loader import normalize
from pipeline.models import tta
from pipeline.models.predictor import FoldModel, load_weights, save_checkpoint

if TYPE_CHECKING:
    from pipeline.training.loop import Fold, LoopState

RECORD = "average.json"


def epoch_file(f: Fold, epoch: int):
    return f.dir / f"epoch{epoch}.safetensors"


def candidates(log: list[dict], k: int, of: str, metric) -> list[int]:
    """The epochs worth keeping: the last k, or the k best by validation score (best first;
    the earlier among equals)."""
    if of == "last":
        return [row["epoch"] for row in log[-k:]]
    sign = -1 if metrics.higher_is_better(metric) else 1
    ranked = sorted(log, key=lambda row: (sign * row["val_metric"], row["epoch"]))
    return [row["epoch"] for row in ranked[:k]]


def kind(f: Fold) -> str:
    """`train.average.of`, or `last` when the fold does not choose on its validation rows (a
    refit, `train.keep: last`)."""
    return f.exp.cfg.train.average.of if f.chooses else "last"


def keep_checkpoint(f: Fold, log: list[dict]) -> None:
    """Save this epoch's weights while they are a candidate and drop those that are not."""
    avg = f.exp.cfg.train.average
    keep = set(candidates(log, avg.checkpoints, kind(f), f.exp.cfg.metric))
    if f.exp.rt.world.primary:
        if log[-1]["epoch"] in keep:
            save_checkpoint(epoch_file(f, log[-1]["epoch"]), f.weights, f.task)
        for path in f.dir.glob("epoch*.safetensors"):
            if int(path.stem[len("epoch"):]) not in keep:
                path.unlink()
    f.exp.rt.barrier()


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating tensors; integer buffers (BatchNorm's counts) from
    the first."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            if v.is_floating_point() else v for k, v in states[0].items()}


@torch.no_grad()
def recompute_batchnorm(f: Fold, model: torch.nn.Module) -> None:
    """BatchNorm running statistics recomputed as the plain mean over the fold's training
    images (their centre crops, no augmentation)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    exp = f.exp
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean
    model.train()
    rows = f.dataset.rows[f.dataset.rows < len(exp.comp.y)]
    for x in exp.batches(exp.images, rows, exp.cfg.train.eval_batch_size):
        x, = exp.rt.to_device(x)
        crop = tta.apply_view(x, exp.cfg.image_size, tta.View("centre"))
        with exp.rt.autocast():
            model(normalize(crop, exp.spec, exp.cfg.train.channels_last))
    model.eval()


def score(f: Fold, state: dict[str, torch.Tensor]) -> tuple[float, torch.nn.Module]:
    """The validation score of the weights `state` (BatchNorm recomputed) in the fold's model
    (undefined without validation rows: a refit)."""
    model = f.weights
    model.load_state_dict(state)
    recompute_batchnorm(f, model)
    if not len(f.val_rows):
        return np.nan, model
    pred = f.exp.predict_plain(FoldModel(model, f.task), f.val_rows)
    return metrics.score(f.exp.cfg.metric, f.exp.comp.task, f.exp.comp.y[f.val_rows], pred), model


def average_fold(f: Fold, state: LoopState, log: list[dict]) -> None:
    """Average the fold's candidate checkpoints (see the module doc), once."""
    record = f.dir / RECORD
    if record.is_file():
        return
    avg, metric, of = f.exp.cfg.train.average, f.exp.cfg.metric, kind(f)
    order = candidates(log, avg.checkpoints, of, metric)
    states = {e: load_weights(epoch_file(f, e)) for e in order}
    soup = order[:1] if of == "greedy" else order
    if of == "greedy":
        best_score, _ = score(f, states[soup[0]])
        for e in order[1:]:
            trial, _ = score(f, mean_state([states[x] for x in soup + [e]]))
            if not metrics.better(metric, best_score, trial):
                soup, best_score = soup + [e], trial
    averaged, model = score(f, mean_state([states[e] for e in soup]))
    kept = not f.chooses or not metrics.better(metric, state.best, averaged)
    if f.exp.rt.world.primary:
        if kept:
            save_checkpoint(f.dir / layout.BEST, model, f.task)
        write_json(dict(of=of, epochs=soup, score=averaged, best_epoch_score=state.best,
                        kept=kept), record)
        for path in f.dir.glob("epoch*.safetensors"):
            path.unlink()
        print(f"fold {f.index}: average of epochs {soup}: val {metrics.name(metric)} "
              f"{averaged:.4f} (best epoch {state.best:.4f}): "
              f"{'kept' if kept else 'the best epoch kept'}", file=sys.stderr)
    f.exp.rt.barrier()
