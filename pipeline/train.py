"""Stage 2: train one experiment on every fold -> runs/<comp>/<exp>/{fold<k>/, oof.csv, scores.json}.

Per fold: best checkpoint by the competition metric (`best.safetensors`), a last checkpoint
for resume (`last.pt`, removed once the fold is done), a per-epoch log (`log.csv`) and the
fold's OOF rows (`oof.csv`). `--fold K` (repeatable) trains only those folds, e.g. one per
machine or terminal; the run's oof.csv and scores.json are written once every fold is done.
Runs where `device` says; under `torchrun` on several processes (pipeline.device).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from timm.data import Mixup
from timm.utils import ModelEmaV3
from tqdm import tqdm

from pipeline import cpu, device, finetune, inference, metrics, provenance, runs
from pipeline.artifacts import atomic_path, file_hash, write_csv, write_json, write_text
from pipeline.augment import mixer, train_transform
from pipeline.competition import Competition, load_competition_data
from pipeline.config import ExperimentConfig, TrainConfig, config_hash, load_experiment
from pipeline.data import (CachedImages, DeviceBatches, EpochLoaders, make_loader,
                           to_memory_format)
from pipeline.errors import UserError, cli, stage_args
from pipeline.folds import folds_path, read_folds
from pipeline.images import image_cache
from pipeline.device import Runtime
from pipeline.models import InputSpec, check_pretrained, create_model, experiment_input


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a fold needs, resolved once per experiment."""

    cfg: ExperimentConfig
    comp: Competition
    folds: np.ndarray  # fold per train row
    images: np.ndarray  # cached uint8 images, one per train row
    side: int  # their side: image_size / crop_pct
    labels: np.ndarray
    spec: InputSpec
    tag: str  # config + fold-file hash; artifacts built from another tag are stale
    rt: Runtime  # where tensors run


def prepare(cfg: ExperimentConfig, rt: Runtime | None = None) -> Setup:
    """The experiment's data, folds, input spec and image cache; readies the process to train
    on `rt` (default: the config's device and precision). Under torchrun rank 0 builds the
    cache first."""
    rt = rt or device.runtime(cfg.device, cfg.train.precision, cfg.train.deterministic)
    if not rt.cuda:
        cpu.reuse_freed_memory()
    with rt.primary_first():
        comp = load_competition_data(cfg)
        fpath = folds_path(cfg.name)
        fold_df = read_folds(fpath)
        lookup = dict(zip(fold_df["id"], fold_df["fold"]))
        missing = [i for i in comp.train["id"] if i not in lookup]
        if missing or len(lookup) != len(comp.train):
            raise UserError(f"{fpath}: ids do not match the train table (e.g. {missing[:1]}); "
                            f"rerun `make folds COMP={cfg.name}`")
        folds = comp.train["id"].map(lookup).to_numpy(np.int64)
        spec, side = experiment_input(cfg, comp.task.n_outputs)
        images = image_cache(list(comp.train["path"]), side, cfg.data.channels, cfg.data.cache_dir)
    # TTA needs no retraining; the device does not change what is trained
    tag = f"{config_hash(cfg, exclude={'tta', 'device'})}-{file_hash(fpath)}"
    return Setup(cfg, comp, folds, images, side, comp.targets(), spec, tag, rt)


def device_batches(s: Setup, loader) -> DeviceBatches:
    """`loader`'s batches as the model's input on the run's device."""
    return DeviceBatches(loader, s.rt, s.spec, s.cfg.train.channels_last)


def cache_batches(s: Setup, images: np.ndarray, rows: np.ndarray, batch: int):
    """Cache rows as uint8 batches of `batch` whole cached images, in order (pinned on a GPU)."""
    loader = make_loader(CachedImages(images, rows, None), batch, False, s.cfg.train.num_workers,
                         0, background=None if not s.rt.cuda else False, pin_memory=s.rt.cuda)
    return (x for x, _ in loader)


def predict_proba(s: Setup, model, rows: np.ndarray) -> np.ndarray:
    """The task's predictions (float64: probabilities, or values) of the centre crops of cache
    `rows`, `train.eval_batch_size` at a time: the one inference path (pipeline.inference) with
    the plain view.

    Under torchrun each rank predicts its share of the rows and every rank gets them all.
    """
    plain = dataclasses.replace(
        inference.experiment_settings(s.cfg, s.spec, s.comp.task, ["none"]), merge="mean",
        max_batch=s.cfg.train.eval_batch_size)
    shard = s.rt.shard(rows)
    if not len(shard):  # under torchrun, a rank with no rows of its own
        return s.rt.gather_rows(np.zeros((0, len(s.comp.classes))))
    model.eval()
    batches = cache_batches(s, s.images, shard, plain.images_per_batch)
    return s.rt.gather_rows(inference.predict_batches([model], batches, plain, s.rt)["none"][0])


def _save_weights(path: Path, model: torch.nn.Module) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp))


def _save_last(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def init_model(s: Setup, fold: int) -> torch.nn.Module:
    """The fold's starting model on the run's device: seeded, so a head or a random init is the
    same every run."""
    seed_everything(s.cfg.seed + fold)
    model = create_model(s.cfg.model, s.comp.task.n_outputs, s.cfg.data.channels).to(s.rt.device)
    if s.cfg.train.sync_bn and s.rt.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return to_memory_format(model, s.cfg.train.channels_last)


def make_mixer(cfg: ExperimentConfig, n_classes: int) -> Mixup | None:
    """timm's Mixup; for tasks other than multi-class only its batch mixing is used
    (`Task.mix`)."""
    return mixer(cfg.augment, n_classes, cfg.train.label_smoothing, cfg.train.batch_size)


def augment_on_device(s: Setup) -> bool:
    """Whether the pixel stages of augmentation run on the model's device (default on a GPU)."""
    where = s.cfg.train.augment_on
    return where == "device" or (where == "auto" and s.rt.cuda)


def train_dataset(s: Setup, fold: int, rows: np.ndarray) -> CachedImages:
    """The fold's training rows with the experiment's augmentation, seeded per fold."""
    cfg = s.cfg
    return CachedImages(s.images, rows, s.labels[rows],
                        train_transform(cfg.augment, cfg.image_size, cfg.seed), cfg.seed + fold,
                        defer=augment_on_device(s))


def epoch_loader(s: Setup, dataset: CachedImages, fold: int, epoch: int):
    """This rank's shard of `dataset`'s shuffled batches for one epoch: `micro_batches` of them."""
    tc, world = s.cfg.train, s.rt.world
    dataset.set_epoch(epoch)
    return make_loader(dataset, tc.batch_size, True, tc.num_workers,
                       epoch_seed(s.cfg.seed, fold, epoch),
                       drop_last=len(dataset) >= tc.batch_size * world.size,
                       background=None if not s.rt.cuda else False,
                       shard=(world.rank, world.size),
                       limit=micro_batches(len(dataset), tc, world.size), pin_memory=s.rt.cuda)


def train_epoch(s: Setup, model, loader, optimizer, lr_factors: list[float], first_trainable: int,
                ema, mix, state: dict, desc: str, scaler=None,
                trained: torch.nn.Module | None = None) -> tuple[float, dict[str, float]]:
    """One pass over `loader` (uint8 batches), optimizer step i at schedule factor
    `lr_factors[i]` (frozen groups at 0), `train.accumulate` batches per step.

    `model` is the module whose parameters train; `trained` what the batches go through (the
    model wrapped by DDP or compiled; default `model`). Returns the mean training loss and each
    group's learning rate at the epoch's first step.
    """
    tc, rt = s.cfg.train, s.rt
    trained = model if trained is None else trained
    params = [p for p in model.parameters() if p.requires_grad]
    n_batches, losses, first_lrs = len(loader), [], {}
    for i, (x, y) in enumerate(tqdm(device_batches(s, loader), desc=desc, file=sys.stderr,
                                    leave=False, mininterval=1.0,
                                    disable=None if rt.world.primary else True)):
        first, last = i % tc.accumulate == 0, (i + 1) % tc.accumulate == 0 or i + 1 == n_batches
        if first:
            finetune.set_lrs(optimizer, lr_factors[i // tc.accumulate], first_trainable)
            first_lrs = first_lrs or finetune.group_lr_row(optimizer)
        with rt.no_sync(trained, not last), rt.autocast():
            if mix is not None:
                x, y = s.comp.task.mix(mix, x, y)
            loss = s.comp.task.loss(trained(x).float(), y, tc.label_smoothing)
        if first:  # the last step's gradients are freed only now: their memory serves this one's
            optimizer.zero_grad(set_to_none=True)
        rt.backward(loss / tc.accumulate if tc.accumulate > 1 else loss, scaler)
        if last:
            rt.step(optimizer, scaler, params, tc.grad_clip)
            if ema is not None:
                ema.update(model, step=state["step"])
            state["step"] += 1
        losses.append(loss.detach())
    return float(torch.stack(losses).mean()), first_lrs


def resume(last: Path, tag: str, model, optimizer, ema, scaler, fresh: dict) -> dict:
    """Load model, optimizer, EMA and loss scaler from `last` when written with `tag`; returns
    the loop state."""
    if not last.is_file():
        return fresh
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    if ckpt["tag"] != tag:
        return fresh
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["state"]


class Progress:
    """Counts the experiment's epochs left and estimates when it will all be done."""

    def __init__(self, folds: int):
        self.folds, self.left, self.done, self.started = folds, None, 0, time.perf_counter()

    def fold(self, epochs: int) -> None:
        """A fold of `epochs` epochs starts (the first tells how many all the folds hold)."""
        if self.left is None:
            self.left = epochs * self.folds

    def skip(self, epochs: int) -> None:
        """Epochs that need no training (resumed from a checkpoint)."""
        self.left -= epochs

    def epoch_done(self) -> str:
        self.done, self.left = self.done + 1, self.left - 1
        seconds = (time.perf_counter() - self.started) / self.done * max(0, self.left)
        return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s" if self.left > 0 else "done"


def peak_memory_mb(rt: Runtime) -> float:
    """Peak memory of this process so far: the GPU's allocations, or the resident set size."""
    if rt.cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_fold(s: Setup, fold: int, fold_dir: Path, stop_after_epochs: int | None = None,
               progress: Progress | None = None,
               on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train one fold through its stages; leaves best.safetensors, last.pt and log.csv.

    Resumes from `last.pt` (model, optimizer, EMA, loss scaler, stage and epoch) when it was
    written with the same tag. `stop_after_epochs` ends this call after that many epochs,
    exactly as an interruption after an epoch would. Early stopping (`train.patience`) ends the
    current stage; the next stage still runs. Under torchrun every rank trains its shard of
    each batch, and rank 0 writes. `on_epoch(epoch over all stages, validation score)` is
    called once each epoch's checkpoint is written; an exception it raises ends the fold.
    """
    cfg, tc, rt = s.cfg, s.cfg.train, s.rt
    primary = rt.world.primary
    train_rows = np.flatnonzero(s.folds != fold)
    val_rows = np.flatnonzero(s.folds == fold)
    if rt.distributed and len(train_rows) < tc.batch_size * rt.world.size:
        raise UserError(f"train.batch_size: {tc.batch_size} x {rt.world.size} processes is more "
                        f"than fold {fold}'s {len(train_rows)} training images")
    model = init_model(s, fold)
    groups = finetune.layer_groups(model)
    plan = finetune.stage_plan(cfg, len(train_rows), len(groups))
    lrs = finetune.group_lrs(tc.lr, len(groups), *finetune.decay_factors(cfg))
    optimizer = torch.optim.AdamW(finetune.param_groups(model, groups, lrs, tc.weight_decay))
    ema = ModelEmaV3(model, decay=tc.ema_decay) if tc.ema_decay else None
    scaler = rt.grad_scaler()
    mix = make_mixer(cfg, len(s.comp.classes))
    train_ds = train_dataset(s, fold, train_rows)
    y_val = s.labels[val_rows]
    n_steps = steps_per_epoch(len(train_rows), tc.batch_size, tc.accumulate, rt.world.size)
    n_epochs = sum(st.epochs for st in plan)
    progress = progress or Progress(1)
    progress.fold(n_epochs)

    last, log_path = fold_dir / "last.pt", fold_dir / "log.csv"
    state = resume(last, s.tag, model, optimizer, ema, scaler,
                   dict(stage=0, epoch=0, best=metrics.worst(cfg.metric), bad_epochs=0, step=0))
    metric = metrics.name(cfg.metric)
    log = []
    if state["step"]:
        done = sum(st.epochs for st in plan[:state["stage"]]) + state["epoch"]
        progress.skip(done)
        if primary:
            print(f"fold {fold}: resuming at stage {state['stage']} epoch {state['epoch']}",
                  file=sys.stderr)
        if log_path.is_file():  # rows of epochs after the checkpoint's (killed between writes)
            log = [r for r in pd.read_csv(log_path).to_dict("records") if r["epoch"] < done]

    done_epochs, wrapped_for = 0, None
    with EpochLoaders(lambda e: epoch_loader(s, train_ds, fold, e), n_epochs) as loaders:
        while state["stage"] < len(plan):
            si, stage = state["stage"], plan[state["stage"]]
            first_trainable = len(groups) - stage.trainable
            if stop_after_epochs is not None and done_epochs >= stop_after_epochs:
                break
            frozen = finetune.apply_freeze(model, groups, stage.trainable)
            if wrapped_for != stage.trainable:  # DDP syncs only what trains when it is built
                trained, wrapped_for = rt.wrap(model), stage.trainable
                if tc.compile:  # after DDP, which then splits graphs at its buckets (as timm)
                    trained = torch.compile(trained)
            total, warmup = stage.epochs * n_steps, int(cfg.finetune.warmup_epochs * n_steps)
            epoch = state["epoch"]
            global_epoch = sum(st.epochs for st in plan[:si]) + epoch
            started = time.perf_counter()
            # dropout and mixing differ per rank; shuffling and augmentation do not
            seed_everything(epoch_seed(cfg.seed, fold, global_epoch) + 7919 * rt.world.rank)
            loader = loaders.get(global_epoch)
            model.train()
            if cfg.finetune.bn == "frozen":
                finetune.freeze_batchnorm(model, frozen)
            desc = f"fold {fold} stage {si} epoch {epoch + 1}/{stage.epochs}"
            factors = [finetune.schedule_factor(epoch * n_steps + i, total, warmup,
                                                cfg.finetune.schedule) for i in range(n_steps)]
            loss, epoch_lrs = train_epoch(s, model, loader, optimizer, factors, first_trainable,
                                          ema, mix, state, desc, scaler, trained)
            train_seconds = time.perf_counter() - started
            weights = ema.module if ema is not None else model
            proba = predict_proba(s, weights, val_rows)
            val_score = metrics.score(cfg.metric, y_val, proba)
            images = len(loader) * tc.batch_size * rt.world.size
            log.append(dict(epoch=global_epoch, stage=si, stage_epoch=epoch,
                            trainable_groups=stage.trainable, train_loss=loss,
                            val_loss=metrics.loss_metric(y_val, proba), val_metric=val_score,
                            **epoch_lrs, seconds=round(time.perf_counter() - started, 2),
                            images_per_s=round(images / train_seconds, 1),
                            peak_mem_mb=round(peak_memory_mb(rt), 1)))
            eta = progress.epoch_done()
            if primary:
                print(f"{desc}: train loss {loss:.4f}, val {metric} {val_score:.4f}, "
                      f"{images / train_seconds:.0f} img/s, {eta}", file=sys.stderr)
            if metrics.better(cfg.metric, val_score, state["best"]):
                state.update(best=val_score, bad_epochs=0)
                if primary:
                    _save_weights(fold_dir / "best.safetensors", weights)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if state["epoch"] >= stage.epochs or (tc.patience and state["bad_epochs"] >= tc.patience):
                state.update(stage=si + 1, epoch=0, bad_epochs=0)
            if primary:
                write_csv(pd.DataFrame(log), log_path)
                _save_last(last, dict(tag=s.tag, model=model.state_dict(), state=dict(state),
                                      optimizer=optimizer.state_dict(),
                                      ema=ema.state_dict() if ema is not None else {},
                                      scaler=scaler.state_dict() if scaler is not None else {}))
            rt.barrier()
            done_epochs += 1
            if on_epoch is not None:
                on_epoch(global_epoch, val_score)


def load_fold_model(s: Setup, fold_dir: Path) -> torch.nn.Module:
    """A fold's best weights in its model, on the run's device, ready to predict."""
    settings = inference.experiment_settings(s.cfg, s.spec, s.comp.task, ["none"])
    return inference.load_model(settings, fold_dir / "best.safetensors", s.rt.device)


def proba_frame(ids, fold, proba: np.ndarray, classes) -> pd.DataFrame:
    df = pd.DataFrame(proba, columns=list(classes))
    df.insert(0, "fold", fold)
    df.insert(0, "id", list(ids))
    return df


def fold_oof(s: Setup, fold: int, fold_dir: Path) -> pd.DataFrame:
    rows = np.flatnonzero(s.folds == fold)
    proba = predict_proba(s, load_fold_model(s, fold_dir), rows)
    return proba_frame(s.comp.train["id"].iloc[rows], fold, proba, s.comp.classes)


def run(cfg: ExperimentConfig, only: list[int] | None = None) -> dict | None:
    """Train the folds not yet done (all, or those in `only`); the run's OOF and scores once
    every fold is done, else None. A finished run of another tag moves to the history
    (pipeline.runs); provenance.json records what built this one and each fold's wall time."""
    finetune.check_finetune(cfg)
    check_pretrained(cfg.model)
    n_splits = cfg.folds.n_splits
    outside = sorted(set(only or []) - set(range(n_splits)))
    if outside:
        raise UserError(f"--fold {outside[0]}: the folds are 0 to {n_splits - 1} (folds.n_splits)")
    s = prepare(cfg)
    run_dir, primary = cfg.run_dir, s.rt.world.primary
    prov_path = run_dir / "provenance.json"
    if primary:
        print(f"{cfg.experiment}: training on {s.rt.describe()}", file=sys.stderr)
        runs.start_version(run_dir, s.tag)
        write_text(cfg.model_dump_json(indent=2) + "\n", run_dir / "config.json")
        record = provenance.collect(s.rt.device_name(), s.rt.precision, s.rt.world.size)
        if prov_path.is_file():  # a resumed run keeps the times of the folds already done
            record["fold_seconds"] = json.loads(prov_path.read_text()).get("fold_seconds", {})
        write_json(record, prov_path)
    s.rt.barrier()
    done = [run_dir / f"fold{k}" / "oof.csv" for k in range(n_splits)]
    todo = [k for k in (sorted(set(only)) if only else range(n_splits)) if not done[k].is_file()]
    progress = Progress(len(todo))
    try:
        for fold in todo:
            started = time.perf_counter()
            train_fold(s, fold, done[fold].parent, progress=progress)
            oof = fold_oof(s, fold, done[fold].parent)
            if primary:
                write_csv(oof, done[fold])
                (done[fold].parent / "last.pt").unlink(missing_ok=True)  # resume needs it no more
                record.setdefault("fold_seconds", {})[str(fold)] = round(
                    time.perf_counter() - started, 3)
                write_json(record, prov_path)
            s.rt.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{cfg.experiment}: the next train resumes at "
                                f"{runs.resume_point(run_dir, n_splits)}") from None
    if not primary:
        return None
    missing = [k for k in range(n_splits) if not done[k].is_file()]
    if missing:
        print(f"{cfg.experiment}: folds {', '.join(map(str, missing))} still to train; oof.csv and "
              f"scores.json follow once they are done", file=sys.stderr)
        return None
    frames = [pd.read_csv(path, dtype={"id": str}, keep_default_na=False) for path in done]
    oof = pd.concat(frames).set_index("id").loc[list(s.comp.train["id"])].reset_index()
    proba = oof[list(s.comp.classes)].to_numpy()
    per_fold = metrics.fold_scores(cfg.metric, s.labels, s.folds, proba)
    cv = metrics.score(cfg.metric, s.labels, proba, ids=oof["id"])
    baseline = metrics.score(cfg.metric, s.labels, s.comp.task.baseline(s.labels), ids=oof["id"])
    scores = dict(metric=metrics.name(cfg.metric), per_fold=per_fold, cv=cv,
                  baseline_cv=baseline, tag=s.tag)
    write_json(scores, run_dir / "scores.json")
    write_csv(oof, run_dir / "oof.csv")
    print(f"{cfg.experiment}: CV {metrics.name(cfg.metric)} {cv:.5f} (trivial baseline "
          f"{baseline:.5f}; folds "
          f"{', '.join(f'{v:.4f}' for v in per_fold.values())})", file=sys.stderr)
    return scores


def _fold_option(parser) -> None:
    parser.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml", _fold_option)
    cfg = load_experiment(args.config, args.overrides)
    try:
        run(cfg, args.fold)
    finally:
        device.close()


if __name__ == "__main__":
    main()
