"""Stage 2: train one experiment on every fold -> runs/<comp>/<exp>/{fold<k>/, oof.csv, scores.json}.

Per fold: best checkpoint by the competition metric (`best.safetensors`), a last checkpoint
for resume (`last.pt`), a per-epoch log (`log.csv`) and the fold's OOF rows (`oof.csv`).
`--fold K` (repeatable) trains only those folds, e.g. one per machine or terminal; the run's
oof.csv and scores.json are written once every fold is done.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from tqdm import tqdm

from pipeline import cpu, finetune, metrics, provenance, runs
from pipeline.artifacts import atomic_path, file_hash, write_csv, write_json, write_text
from pipeline.augment import eval_transform, mixer, train_transform
from pipeline.competition import Competition, load_competition_data
from pipeline.config import ExperimentConfig, config_hash, load_experiment
from pipeline.data import (CachedImages, EpochLoaders, make_loader, normalize,
                           to_memory_format)
from pipeline.errors import UserError, cli, stage_args
from pipeline.folds import folds_path, read_folds
from pipeline.images import image_cache
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


def prepare(cfg: ExperimentConfig) -> Setup:
    """The experiment's data, folds, input spec and image cache; readies the process to train."""
    cpu.reuse_freed_memory()
    comp = load_competition_data(cfg)
    fpath = folds_path(cfg.name)
    fold_df = read_folds(fpath)
    lookup = dict(zip(fold_df["id"], fold_df["fold"]))
    missing = [i for i in comp.train["id"] if i not in lookup]
    if missing or len(lookup) != len(comp.train):
        raise UserError(f"{fpath}: ids do not match the train table (e.g. {missing[:1]}); "
                        f"rerun `make folds COMP={cfg.name}`")
    folds = comp.train["id"].map(lookup).to_numpy(np.int64)
    spec, side = experiment_input(cfg, len(comp.classes))
    images = image_cache(list(comp.train["path"]), side, cfg.data.channels, cfg.data.cache_dir)
    tag = f"{config_hash(cfg, exclude={'tta'})}-{file_hash(fpath)}"  # TTA needs no retraining
    return Setup(cfg, comp, folds, images, side, comp.target_index(), spec, tag)


def predict_proba(model, loader, spec: InputSpec) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            out.append(F.softmax(model(normalize(x, spec)).float(), dim=1))
    proba = torch.cat(out).numpy().astype(np.float64)
    return proba / proba.sum(1, keepdims=True)


def eval_loader(s: Setup, rows: np.ndarray) -> torch.utils.data.DataLoader:
    ds = CachedImages(s.images, rows, s.labels[rows], eval_transform(s.cfg.image_size))
    return make_loader(ds, s.cfg.train.eval_batch_size, False, s.cfg.train.num_workers, 0)


def _save_weights(path: Path, model: torch.nn.Module) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def _save_last(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """One seed per (experiment seed, fold, epoch): shuffling, augmentation, dropout, mixing."""
    return seed * 1_000_003 + fold * 10_007 + epoch


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches only (a last batch of one would upset BatchNorm), unless data < one batch."""
    return max(1, n_train // batch_size)


def init_model(s: Setup, fold: int) -> torch.nn.Module:
    """The fold's starting model: seeded, so a head or a random init is the same every run."""
    seed_everything(s.cfg.seed + fold)
    return to_memory_format(create_model(s.cfg.model, len(s.comp.classes), s.cfg.data.channels),
                            s.cfg.train.channels_last)


def make_mixer(cfg: ExperimentConfig, n_classes: int) -> Mixup | None:
    return mixer(cfg.augment, n_classes, cfg.train.label_smoothing, cfg.train.batch_size)


def train_dataset(s: Setup, fold: int, rows: np.ndarray) -> CachedImages:
    """The fold's training rows with the experiment's augmentation, seeded per fold."""
    cfg = s.cfg
    return CachedImages(s.images, rows, s.labels[rows],
                        train_transform(cfg.augment, cfg.image_size, cfg.seed), cfg.seed + fold)


def epoch_loader(s: Setup, dataset: CachedImages, fold: int, epoch: int):
    """`dataset`'s shuffled batches for one epoch (full batches only, unless data < one batch)."""
    tc = s.cfg.train
    dataset.set_epoch(epoch)
    return make_loader(dataset, tc.batch_size, True, tc.num_workers,
                       epoch_seed(s.cfg.seed, fold, epoch), drop_last=len(dataset) >= tc.batch_size)


def train_epoch(s: Setup, model, loader, optimizer, lr_factors: list[float], first_trainable: int,
                ema, mix, state: dict, desc: str) -> tuple[float, dict[str, float]]:
    """One pass over `loader`, batch i at schedule factor `lr_factors[i]` (frozen groups at 0).

    Returns the mean training loss and each group's learning rate at the epoch's first step.
    """
    tc = s.cfg.train
    losses, first_lrs = [], {}
    for i, (x, y) in enumerate(tqdm(loader, desc=desc, file=sys.stderr, leave=False,
                                    mininterval=1.0, disable=None)):  # no bar in logs
        finetune.set_lrs(optimizer, lr_factors[i], first_trainable)
        first_lrs = first_lrs or finetune.group_lr_row(optimizer)
        x = normalize(x, s.spec, tc.channels_last)
        if mix is not None:
            x, y_soft = mix(x, y)
            loss = SoftTargetCrossEntropy()(model(x), y_soft)
        else:
            loss = F.cross_entropy(model(x), y, label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           tc.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, step=state["step"])
        state["step"] += 1
        losses.append(loss.item())
    return float(np.mean(losses)), first_lrs


def resume(last: Path, tag: str, model, optimizer, ema, fresh: dict) -> dict:
    """Load model, optimizer and EMA from `last` when written with `tag`; returns the loop state."""
    if not last.is_file():
        return fresh
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    if ckpt["tag"] != tag:
        return fresh
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    return ckpt["state"]


def train_fold(s: Setup, fold: int, fold_dir: Path, stop_after_epochs: int | None = None) -> None:
    """Train one fold through its stages; leaves best.safetensors, last.pt and log.csv.

    Resumes from `last.pt` (model, optimizer, EMA, stage and epoch) when it was written with
    the same tag. `stop_after_epochs` ends this call after that many epochs, exactly as an
    interruption after an epoch would. Early stopping (`train.patience`) ends the current
    stage; the next stage still runs.
    """
    cfg, tc = s.cfg, s.cfg.train
    train_rows = np.flatnonzero(s.folds != fold)
    val_rows = np.flatnonzero(s.folds == fold)
    model = init_model(s, fold)
    groups = finetune.layer_groups(model)
    plan = finetune.stage_plan(cfg, len(train_rows), len(groups))
    lrs = finetune.group_lrs(tc.lr, len(groups), *finetune.decay_factors(cfg))
    optimizer = torch.optim.AdamW(finetune.param_groups(model, groups, lrs, tc.weight_decay))
    ema = ModelEmaV3(model, decay=tc.ema_decay) if tc.ema_decay else None
    mix = make_mixer(cfg, len(s.comp.classes))
    train_ds = train_dataset(s, fold, train_rows)
    val_loader = eval_loader(s, val_rows)
    y_val = s.labels[val_rows]
    n_steps = steps_per_epoch(len(train_rows), tc.batch_size)

    last, log_path = fold_dir / "last.pt", fold_dir / "log.csv"
    state = resume(last, s.tag, model, optimizer, ema,
                   dict(stage=0, epoch=0, best=metrics.worst(cfg.metric), bad_epochs=0, step=0))
    if state["step"]:
        print(f"fold {fold}: resuming at stage {state['stage']} epoch {state['epoch']}",
              file=sys.stderr)
    log = pd.read_csv(log_path).to_dict("records") if state["step"] and log_path.is_file() else []

    done_epochs = 0
    with EpochLoaders(lambda e: epoch_loader(s, train_ds, fold, e),
                      sum(st.epochs for st in plan)) as loaders:
        while state["stage"] < len(plan):
            si, stage = state["stage"], plan[state["stage"]]
            first_trainable = len(groups) - stage.trainable
            if stop_after_epochs is not None and done_epochs >= stop_after_epochs:
                break
            frozen = finetune.apply_freeze(model, groups, stage.trainable)
            total, warmup = stage.epochs * n_steps, int(cfg.finetune.warmup_epochs * n_steps)
            epoch = state["epoch"]
            global_epoch = sum(st.epochs for st in plan[:si]) + epoch
            started = time.perf_counter()
            seed_everything(epoch_seed(cfg.seed, fold, global_epoch))
            loader = loaders.get(global_epoch)
            model.train()
            if cfg.finetune.bn == "frozen":
                finetune.freeze_batchnorm(model, frozen)
            desc = f"fold {fold} stage {si} epoch {epoch + 1}/{stage.epochs}"
            factors = [finetune.schedule_factor(epoch * n_steps + i, total, warmup,
                                                cfg.finetune.schedule) for i in range(n_steps)]
            loss, epoch_lrs = train_epoch(s, model, loader, optimizer, factors, first_trainable,
                                          ema, mix, state, desc)
            eval_model = ema.module if ema is not None else model
            proba = predict_proba(eval_model, val_loader, s.spec)
            val_score = metrics.score(cfg.metric, y_val, proba)
            log.append(dict(epoch=global_epoch, stage=si, stage_epoch=epoch,
                            trainable_groups=stage.trainable, train_loss=loss,
                            val_loss=metrics.score("log_loss", y_val, proba), val_metric=val_score,
                            **epoch_lrs, seconds=round(time.perf_counter() - started, 2)))
            print(f"{desc}: train loss {loss:.4f}, val {cfg.metric} {val_score:.4f}", file=sys.stderr)
            if metrics.better(cfg.metric, val_score, state["best"]):
                state.update(best=val_score, bad_epochs=0)
                _save_weights(fold_dir / "best.safetensors", eval_model)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if state["epoch"] >= stage.epochs or (tc.patience and state["bad_epochs"] >= tc.patience):
                state.update(stage=si + 1, epoch=0, bad_epochs=0)
            write_csv(pd.DataFrame(log), log_path)
            _save_last(last, dict(tag=s.tag, model=model.state_dict(), state=dict(state),
                                  optimizer=optimizer.state_dict(),
                                  ema=ema.state_dict() if ema is not None else {}))
            done_epochs += 1


def load_fold_model(s: Setup, fold_dir: Path) -> torch.nn.Module:
    model = create_model(s.cfg.model.model_copy(update={"pretrained": False}),
                         len(s.comp.classes), s.cfg.data.channels)
    model.load_state_dict(load_file(str(fold_dir / "best.safetensors")))
    return to_memory_format(model, s.cfg.train.channels_last).eval()


def proba_frame(ids, fold, proba: np.ndarray, classes) -> pd.DataFrame:
    df = pd.DataFrame(proba, columns=list(classes))
    df.insert(0, "fold", fold)
    df.insert(0, "id", list(ids))
    return df


def fold_oof(s: Setup, fold: int, fold_dir: Path) -> pd.DataFrame:
    rows = np.flatnonzero(s.folds == fold)
    proba = predict_proba(load_fold_model(s, fold_dir), eval_loader(s, rows), s.spec)
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
    run_dir = cfg.run_dir
    runs.start_version(run_dir, s.tag)
    write_text(cfg.model_dump_json(indent=2) + "\n", run_dir / "config.json")
    record = provenance.collect()
    prov_path = run_dir / "provenance.json"
    if prov_path.is_file():  # a resumed run keeps the times of the folds already done
        record["fold_seconds"] = json.loads(prov_path.read_text()).get("fold_seconds", {})
    write_json(record, prov_path)
    done = [run_dir / f"fold{k}" / "oof.csv" for k in range(n_splits)]
    try:
        for fold in sorted(set(only)) if only else range(n_splits):
            if not done[fold].is_file():
                started = time.perf_counter()
                train_fold(s, fold, done[fold].parent)
                write_csv(fold_oof(s, fold, done[fold].parent), done[fold])
                (done[fold].parent / "last.pt").unlink(missing_ok=True)  # resume needs it no more
                record.setdefault("fold_seconds", {})[str(fold)] = round(
                    time.perf_counter() - started, 3)
                write_json(record, prov_path)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{cfg.experiment}: the next train resumes at "
                                f"{runs.resume_point(run_dir, n_splits)}") from None
    missing = [k for k in range(n_splits) if not done[k].is_file()]
    if missing:
        print(f"{cfg.experiment}: folds {', '.join(map(str, missing))} still to train; oof.csv and "
              f"scores.json follow once they are done", file=sys.stderr)
        return None
    frames = [pd.read_csv(path, dtype={"id": str}, keep_default_na=False) for path in done]
    oof = pd.concat(frames).set_index("id").loc[list(s.comp.train["id"])].reset_index()
    proba = oof[list(s.comp.classes)].to_numpy()
    per_fold = metrics.fold_scores(cfg.metric, s.labels, s.folds, proba)
    cv = metrics.score(cfg.metric, s.labels, proba)
    scores = dict(metric=cfg.metric, per_fold=per_fold, cv=cv, tag=s.tag)
    write_json(scores, run_dir / "scores.json")
    write_csv(oof, run_dir / "oof.csv")
    print(f"{cfg.experiment}: CV {cfg.metric} {cv:.5f} (folds "
          f"{', '.join(f'{v:.4f}' for v in per_fold.values())})", file=sys.stderr)
    return scores


def _fold_option(parser) -> None:
    parser.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml", _fold_option)
    run(load_experiment(args.config, args.overrides), args.fold)


if __name__ == "__main__":
    main()
