"""One fold's training: the loop, its state, and the end-of-epoch hooks.

`train_fold` runs a fold's fine-tuning stages epoch by epoch: train one epoch, evaluate the
model (its EMA when set) through the one inference path, then the end-of-epoch hooks in a
fixed order, which resume and determinism depend on:

1. `keep_best`: a better validation score is kept, and its weights written to best.safetensors
   (with `train.average`, then `averaging.keep_checkpoint` keeps the epoch's weights while
   they are a candidate for the average made when the fold's stages are done);
2. `advance`: the loop moves to the next epoch, or the next stage when this one is done or
   early stopping (`train.patience`) ends it;
3. `save_progress`: log.csv and last.pt (model, optimizer, EMA, loss scaler, loop state) are
   written, so a killed run resumes after this epoch, exactly as if uninterrupted;
4. `report`: one line with the scores, images/s and the ETA;
5. `on_epoch(epoch, score)`: the caller's callback (the tuner's pruning); may end the fold.

Under torchrun every rank trains its shard of each batch; rank 0 writes, every rank waits.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from tqdm import tqdm

from pipeline.core import layout, metrics
from pipeline.core.artifacts import write_csv
from pipeline.core.config import ExperimentConfig, TrainConfig
from pipeline.core.tasks import Task
from pipeline.core.errors import UserError
from pipeline.data.augment import mixer, train_transform
from pipeline.data.loader import CachedImages, DeviceBatches, EpochLoaders, make_loader, \
    to_memory_format
from pipeline.models import finetune
from pipeline.models.factory import create_model
from pipeline.models.predictor import FoldModel, save_checkpoint
from pipeline.training import averaging
from pipeline.training.checkpoints import load_last, save_last
from pipeline.training.experiment import Experiment, seed_everything


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """One seed per (experiment seed, fold, epoch): shuffling, augmentation, dropout, mixing."""
    return seed * 1_000_003 + fold * 10_007 + epoch


def steps_per_epoch(n_train: int, batch_size: int, accumulate: int = 1, world: int = 1) -> int:
    """Optimizer steps per epoch: full global batches (batch_size x accumulate x world) only,
    a last batch of one would upset BatchNorm; one step when the data is less than that."""
    return max(1, n_train // (batch_size * accumulate * world))


def micro_batches(n_train: int, tc: TrainConfig, world: int) -> int:
    """Loader batches per epoch and rank: `accumulate` per optimizer step, all full, unless
    the data is less than one optimizer step's worth (then one step over all of it)."""
    per_step = tc.batch_size * tc.accumulate * world
    if n_train >= per_step:
        return steps_per_epoch(n_train, tc.batch_size, tc.accumulate, world) * tc.accumulate
    return -(-n_train // (tc.batch_size * world))


@dataclass
class LoopState:
    """Where a fold's training is; last.pt saves it, resume restores it."""

    stage: int = 0  # the current fine-tuning stage
    epoch: int = 0  # epochs done in the current stage
    best: float = 0.0  # the best validation score so far
    bad_epochs: int = 0  # epochs since the best (early stopping counts them)
    step: int = 0  # optimizer steps so far (the EMA's warm-up counts them)


@dataclass
class Fold:
    """One fold's training: the model and what updates it, its data and its stage plan."""

    exp: Experiment
    index: int
    dir: Path
    task: Task  # the competition's task fitted on this fold's training rows
    model: torch.nn.Module
    groups: list[list[str]]  # parameter names per layer group, bottom to top
    plan: list[finetune.Stage]
    optimizer: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler | None
    mix: Mixup | None
    dataset: CachedImages  # the training rows, augmented
    val_rows: np.ndarray  # none for a full-data refit
    steps: int  # optimizer steps per epoch
    soft: bool = False  # targets in prediction space with a loss weight (FoldData.targets)
    trained: torch.nn.Module | None = None  # what batches go through: DDP, compiled
    trained_groups: int = 0  # the trainable groups `trained` was wrapped for

    @property
    def n_epochs(self) -> int:
        return sum(st.epochs for st in self.plan)

    def epoch_index(self, state: LoopState) -> int:
        """The current epoch counted over all stages, from 0."""
        return sum(st.epochs for st in self.plan[:state.stage]) + state.epoch

    @property
    def weights(self) -> torch.nn.Module:
        """What is evaluated and saved: the EMA when set, else the model."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def evaluated(self) -> FoldModel:
        return FoldModel(self.weights, self.task)

    @property
    def chooses(self) -> bool:
        """Whether the fold keeps what scores best on its validation rows (`train.keep: best`
        and rows to score: not a refit)."""
        return self.exp.cfg.train.keep == "best" and len(self.val_rows) > 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, trained: torch.nn.Module) -> torch.Tensor:
        """The batch's training loss, mixed (mixup/cutmix) where configured: labels through the
        task's loss, soft targets (with their weights, mixed alike) through its soft loss."""
        if self.mix is not None:
            x, y = self.task.mix_soft(self.mix, x, y) if self.soft else self.task.mix(self.mix, x, y)
        out = trained(x).float()
        if self.soft:
            return self.task.soft_loss(out, y)
        return self.task.loss(out, y, self.exp.cfg.train.label_smoothing)


@dataclass(frozen=True)
class FoldData:
    """What a fold trains on when it is not its training rows with their labels: rows of an
    image cache with targets in prediction space, a loss weight each (pipeline.training.teacher;
    None: the labels), the rows it is validated on (none for a refit) and its stages (a
    refit's, from the folds' best epochs)."""

    images: np.ndarray
    rows: np.ndarray
    targets: np.ndarray | None
    val_rows: np.ndarray
    plan: list[finetune.Stage] | None = None


def init_model(exp: Experiment, fold: int) -> torch.nn.Module:
    """The fold's starting model on the run's device: seeded, so a head or a random init is the
    same every run."""
    seed_everything(exp.cfg.seed + fold)
    model = create_model(exp.cfg.model, exp.comp.task.n_outputs, exp.cfg.data.channels)
    model = model.to(exp.rt.device)
    if exp.cfg.train.sync_bn and exp.rt.distributed:
        if not exp.rt.cuda:
            raise UserError("train.sync_bn: SyncBatchNorm runs on GPUs only; set it false on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return to_memory_format(model, exp.cfg.train.channels_last)


def build_optimizer(cfg: ExperimentConfig, model: torch.nn.Module,
                    groups: list[list[str]]) -> torch.optim.Optimizer:
    """AdamW with a parameter group per layer group, each at its discriminative rate."""
    lrs = finetune.group_lrs(cfg.train.lr, len(groups), *finetune.decay_factors(cfg))
    return torch.optim.AdamW(finetune.param_groups(model, groups, lrs, cfg.train.weight_decay))


def make_mixer(cfg: ExperimentConfig, n_classes: int) -> Mixup | None:
    """timm's Mixup; for tasks other than multi-class only its batch mixing is used
    (`Task.mix`)."""
    return mixer(cfg.augment, n_classes, cfg.train.label_smoothing, cfg.train.batch_size)


def augment_on_device(exp: Experiment) -> bool:
    """Whether the pixel stages of augmentation run on the model's device (default on a GPU)."""
    where = exp.cfg.train.augment_on
    return where == "device" or (where == "auto" and exp.rt.cuda)


def train_dataset(exp: Experiment, fold: int, rows: np.ndarray, images: np.ndarray | None = None,
                  targets: np.ndarray | None = None) -> CachedImages:
    """The fold's training rows with the experiment's augmentation, seeded per fold: rows of
    the train image cache with their labels, or of `images` with `targets`."""
    cfg = exp.cfg
    return CachedImages(exp.images if images is None else images, rows,
                        exp.comp.y[rows] if targets is None else targets,
                        train_transform(cfg.augment, cfg.image_size, cfg.seed), cfg.seed + fold,
                        defer=augment_on_device(exp))


def epoch_loader(exp: Experiment, dataset: CachedImages, fold: int, epoch: int):
    """This rank's shard of `dataset`'s shuffled batches for one epoch: `micro_batches` of them."""
    tc, world = exp.cfg.train, exp.rt.world
    dataset.set_epoch(epoch)
    return make_loader(dataset, tc.batch_size, True, tc.num_workers,
                       epoch_seed(exp.cfg.seed, fold, epoch),
                       drop_last=len(dataset) >= tc.batch_size * world.size,
                       shard=(world.rank, world.size),
                       limit=micro_batches(len(dataset), tc, world.size), **exp.rt.loader_options())


def start_fold(exp: Experiment, fold: int, fold_dir: Path, data: FoldData | None = None) -> Fold:
    """Fold `fold`'s model (seeded by `fold`), layer groups, stage plan, optimizer, EMA, loss
    scaler, mixer and data: the rows of the other folds with their labels, or `data`."""
    cfg, tc, rt = exp.cfg, exp.cfg.train, exp.rt
    if data is None:
        data = FoldData(exp.images, np.flatnonzero(exp.folds != fold), None,
                        np.flatnonzero(exp.folds == fold))
    labelled = data.rows[data.rows < len(exp.comp.y)]  # the train rows (pseudo rows follow)
    if rt.distributed and len(data.rows) < tc.batch_size * rt.world.size:
        raise UserError(f"train.batch_size: {tc.batch_size} x {rt.world.size} processes is more "
                        f"than fold {fold}'s {len(data.rows)} training images")
    model = init_model(exp, fold)
    groups = finetune.layer_groups(model)
    return Fold(exp, fold, fold_dir, exp.comp.task.fit(exp.comp.y[labelled]), model, groups,
                data.plan or finetune.stage_plan(cfg, len(data.rows), len(groups)),
                build_optimizer(cfg, model, groups),
                ModelEmaV3(model, decay=tc.ema_decay) if tc.ema_decay else None,
                rt.grad_scaler(), make_mixer(cfg, len(exp.comp.classes)),
                train_dataset(exp, fold, data.rows, data.images, data.targets), data.val_rows,
                steps_per_epoch(len(data.rows), tc.batch_size, tc.accumulate, rt.world.size),
                data.targets is not None)


def train_epoch(f: Fold, state: LoopState, loader, lr_factors: list[float], first_trainable: int,
                desc: str = "") -> tuple[float, dict[str, float]]:
    """One pass over `loader` (uint8 batches) through `f.trained` (default the model),
    optimizer step i at schedule factor `lr_factors[i]` (groups below `first_trainable` at 0),
    `train.accumulate` batches per step. Returns the mean training loss and each group's
    learning rate at the epoch's first step."""
    exp, tc, rt = f.exp, f.exp.cfg.train, f.exp.rt
    trained = f.model if f.trained is None else f.trained
    params = [p for p in f.model.parameters() if p.requires_grad]
    batches = DeviceBatches(loader, rt, exp.spec, tc.channels_last)
    n_batches, losses, first_lrs = len(loader), [], {}
    for i, (x, y) in enumerate(tqdm(batches, desc=desc, file=sys.stderr, leave=False,
                                    mininterval=1.0, disable=None if rt.world.primary else True)):
        first, last = i % tc.accumulate == 0, (i + 1) % tc.accumulate == 0 or i + 1 == n_batches
        if first:
            finetune.set_lrs(f.optimizer, lr_factors[i // tc.accumulate], first_trainable)
            first_lrs = first_lrs or finetune.group_lr_row(f.optimizer)
        with rt.no_sync(trained, not last), rt.autocast():
            loss = f.loss(x, y, trained)
        if first:  # the last step's gradients are freed only now: their memory serves this one's
            f.optimizer.zero_grad(set_to_none=True)
        rt.backward(loss / tc.accumulate if tc.accumulate > 1 else loss, f.scaler)
        if last:
            rt.step(f.optimizer, f.scaler, params, tc.grad_clip)
            if f.ema is not None:
                f.ema.update(f.model, step=state.step)
            state.step += 1
        losses.append(loss.detach())
    return float(torch.stack(losses).mean()), first_lrs


def begin_epoch(f: Fold, state: LoopState, loaders: EpochLoaders):
    """Ready the current epoch: freeze all but the stage's top groups (wrapping the model for
    DDP and compiling it again when that changes: DDP syncs only what trains when it is
    built), seed the epoch, and put the model in training mode (frozen groups' BatchNorm in
    eval mode with `finetune.bn: frozen`). Returns the epoch's loader."""
    cfg, rt, stage = f.exp.cfg, f.exp.rt, f.plan[state.stage]
    frozen = finetune.apply_freeze(f.model, f.groups, stage.trainable)
    if f.trained_groups != stage.trainable:
        f.trained, f.trained_groups = rt.wrap(f.model), stage.trainable
        if cfg.train.compile:  # after DDP, which then splits graphs at its buckets (as timm)
            f.trained = torch.compile(f.trained)
    # dropout and mixing differ per rank; shuffling and augmentation do not
    seed_everything(epoch_seed(cfg.seed, f.index, f.epoch_index(state)) + 7919 * rt.world.rank)
    loader = loaders.get(f.epoch_index(state))
    f.model.train()
    if cfg.finetune.bn == "frozen":
        finetune.freeze_batchnorm(f.model, frozen)
    return loader


def run_epoch(f: Fold, state: LoopState, loaders: EpochLoaders) -> dict:
    """Train the current epoch and evaluate it; returns its log row."""
    cfg, tc, rt = f.exp.cfg, f.exp.cfg.train, f.exp.rt
    stage = f.plan[state.stage]
    started = time.perf_counter()
    loader = begin_epoch(f, state, loaders)
    total, warmup = stage.epochs * f.steps, int(cfg.finetune.warmup_epochs * f.steps)
    factors = [finetune.schedule_factor(state.epoch * f.steps + i, total, warmup,
                                        cfg.finetune.schedule) for i in range(f.steps)]
    loss, lrs = train_epoch(f, state, loader, factors, len(f.groups) - stage.trainable,
                            f"fold {f.index} stage {state.stage} epoch {state.epoch + 1}/"
                            f"{stage.epochs}")
    train_seconds = time.perf_counter() - started
    if f.ema is not None:  # the next epoch starts from rank 0's statistics on every rank
        rt.broadcast_buffers(f.model)
    rt.broadcast_buffers(f.weights)  # every rank evaluates what rank 0 saves
    val_loss, val_metric = evaluate(f, state) if len(f.val_rows) else (np.nan, np.nan)
    images = len(loader) * tc.batch_size * rt.world.size
    return dict(epoch=f.epoch_index(state), stage=state.stage, stage_epoch=state.epoch,
                trainable_groups=stage.trainable, train_loss=loss, val_loss=val_loss,
                val_metric=val_metric, **lrs, seconds=round(time.perf_counter() - started, 2),
                images_per_s=round(images / train_seconds, 1),
                peak_mem_mb=round(rt.peak_memory_mb(), 1))


def evaluate(f: Fold, state: LoopState) -> tuple[float, float]:
    """(validation loss, validation metric) of the evaluated weights on the fold's rows."""
    task, y = f.exp.comp.task, f.exp.comp.y[f.val_rows]
    pred = f.exp.predict_plain(f.evaluated, f.val_rows)
    if not np.isfinite(pred).all():
        raise UserError(f"fold {f.index} stage {state.stage} epoch {state.epoch + 1}: the "
                        f"validation predictions are not finite: training diverged; lower "
                        f"train.lr, or set train.precision=fp32")
    return (metrics.score(task.loss_metric, task, y, pred),
            metrics.score(f.exp.cfg.metric, task, y, pred))


def keep_best(f: Fold, state: LoopState, row: dict) -> None:
    """The first epoch's weights are kept whatever its score (an undefined one included), later
    ones when they score better; the last epoch's when the fold does not choose (Fold.chooses)."""
    first = state.best == metrics.worst(f.exp.cfg.metric) or not f.chooses
    if first or metrics.better(f.exp.cfg.metric, row["val_metric"], state.best):
        state.best, state.bad_epochs = row["val_metric"], 0
        if f.exp.rt.world.primary:
            save_checkpoint(f.dir / layout.BEST, f.weights, f.task)
    else:
        state.bad_epochs += 1


def advance(f: Fold, state: LoopState) -> None:
    patience = f.exp.cfg.train.patience
    state.epoch += 1
    if state.epoch >= f.plan[state.stage].epochs or (patience and state.bad_epochs >= patience):
        state.stage, state.epoch, state.bad_epochs = state.stage + 1, 0, 0


def save_progress(f: Fold, state: LoopState, log: list[dict]) -> None:
    if f.exp.rt.world.primary:
        write_csv(pd.DataFrame(log), f.dir / layout.LOG)
        save_last(f.dir / layout.LAST, f.exp.tag, dataclasses.asdict(state), f.model, f.optimizer,
                  f.ema, f.scaler)
    f.exp.rt.barrier()


class Progress:
    """Counts the experiment's epochs left and estimates when it will all be done."""

    def __init__(self, folds: int):
        self.folds, self.left, self.done, self.started = folds, None, 0, time.perf_counter()

    def fold(self, epochs: int, done: int = 0) -> None:
        """A fold of `epochs` epochs starts, `done` of them already trained (resumed); the first
        fold tells how many all the folds hold."""
        if self.left is None:
            self.left = epochs * self.folds
        self.left -= done

    def epoch_done(self) -> str:
        self.done, self.left = self.done + 1, self.left - 1
        seconds = (time.perf_counter() - self.started) / self.done * max(0, self.left)
        return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s" if self.left > 0 else "done"


def report(f: Fold, row: dict, progress: Progress) -> None:
    eta = progress.epoch_done()
    if f.exp.rt.world.primary:
        stage_epochs = f.plan[row["stage"]].epochs
        print(f"fold {f.index} stage {row['stage']} epoch {row['stage_epoch'] + 1}/{stage_epochs}: "
              f"train loss {row['train_loss']:.4f}, val {metrics.name(f.exp.cfg.metric)} "
              f"{row['val_metric']:.4f}, {row['images_per_s']:.0f} img/s, {eta}", file=sys.stderr)


def resume(f: Fold) -> tuple[LoopState, list[dict]]:
    """The loop state and log rows to continue from: last.pt's when written with the run's
    tag (log rows after its epoch dropped: killed between the two writes), else fresh."""
    saved = load_last(f.dir / layout.LAST, f.exp.tag, f.model, f.optimizer, f.ema, f.scaler)
    state = LoopState(**saved) if saved else LoopState(best=metrics.worst(f.exp.cfg.metric))
    log, log_path = [], f.dir / layout.LOG
    if state.step and log_path.is_file():
        log = [r for r in pd.read_csv(log_path).to_dict("records") if r["epoch"] < f.epoch_index(state)]
    if state.step and f.exp.rt.world.primary and state.stage < len(f.plan):
        print(f"fold {f.index}: resuming at stage {state.stage} epoch {state.epoch + 1}/"
              f"{f.plan[state.stage].epochs} (as the progress lines count)", file=sys.stderr)
    return state, log


def train_fold(exp: Experiment, fold: int, fold_dir: Path, stop_after_epochs: int | None = None,
               progress: Progress | None = None,
               on_epoch: Callable[[int, float], None] | None = None,
               data: FoldData | None = None) -> None:
    """Train one fold through its stages; leaves best.safetensors, last.pt and log.csv.

    Resumes from `last.pt` when it was written with the same tag. `stop_after_epochs` ends this
    call after that many epochs, exactly as an interruption after an epoch would. Early
    stopping ends the current stage; the next stage still runs. `on_epoch(epoch over all
    stages, validation score)` is called last in each epoch; an exception it raises ends the
    fold. `data`: what the fold trains and is validated on, when not its folds' rows (FoldData).
    """
    f = start_fold(exp, fold, fold_dir, data)
    state, log = resume(f)
    progress = progress or Progress(1)
    progress.fold(f.n_epochs, f.epoch_index(state) if state.step else 0)
    with EpochLoaders(lambda e: epoch_loader(exp, f.dataset, fold, e), f.n_epochs) as loaders:
        for _ in range(f.n_epochs if stop_after_epochs is None else stop_after_epochs):
            if state.stage >= len(f.plan):
                break
            row = run_epoch(f, state, loaders)
            log.append(row)
            keep_best(f, state, row)
            if exp.cfg.train.average:
                averaging.keep_checkpoint(f, log)
            advance(f, state)
            save_progress(f, state, log)
            report(f, row, progress)
            if on_epoch is not None:
                on_epoch(row["epoch"], row["val_metric"])
    if exp.cfg.train.average and state.stage >= len(f.plan):
        averaging.average_fold(f, state, log)
