"""An experiment trained on every fold: the folds not yet done, then the run's OOF and scores.

The run folder is the experiment's current version (pipeline.core.history): a finished run of
another tag moves to the history first. provenance.json records what built it and each
fold's wall time; config.json its resolved config.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.core import history, layout, metrics, provenance
from pipeline.models import finetune
from pipeline.core.artifacts import write_csv, write_json, write_text
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.models.pretrained import check_pretrained
from pipeline.training.checkpoints import resume_point
from pipeline.training.experiment import Experiment, prepare
from pipeline.training import teacher
from pipeline.training.loop import Progress, init_model, train_fold

REFIT_SEED = 1000  # a refit's model is seeded as fold REFIT_SEED + its seed


def start_run(exp: Experiment, fresh: bool = False) -> dict:
    """Make the run folder this version's (rank 0; `fresh`: a new version even of the same
    tag) and write its config and provenance; returns the provenance record (a resumed run
    keeps the times of the folds already done)."""
    run, rt, record = exp.run, exp.rt, {}
    if rt.world.primary:
        print(f"{exp.cfg.experiment}: training on {rt.describe()}", file=sys.stderr)
        record = provenance.collect(rt.device_name(), rt.precision, rt.world.size)
        history.start_version(run, exp.tag, fresh)
        write_text(exp.cfg.model_dump_json(indent=2) + "\n", run.config)
        if run.provenance.is_file():
            record["fold_seconds"] = json.loads(run.provenance.read_text()).get("fold_seconds", {})
        write_json(record, run.provenance)
    rt.barrier()
    return record


def finish_run(exp: Experiment) -> dict:
    """The run's oof.csv (every fold's rows in train-table order) and scores.json."""
    cfg, comp, run = exp.cfg, exp.comp, exp.run
    frames = [pd.read_csv(run.fold_oof(k), dtype={"id": str}, keep_default_na=False)
              for k in range(cfg.folds.n_splits)]
    oof = pd.concat(frames).set_index("id").loc[list(comp.train["id"])].reset_index()
    pred = oof[list(comp.classes)].to_numpy()
    cv = metrics.cv(cfg.metric, comp.task, comp.y, exp.folds, pred, ids=oof["id"])
    baseline = metrics.cv(cfg.metric, comp.task, comp.y, exp.folds, comp.task.baseline(comp.y),
                          ids=oof["id"])
    scores = dict(metric=metrics.name(cfg.metric), per_fold=cv.per_fold, cv=cv.headline,
                  cv_pooled=cv.pooled, cv_fold_mean=cv.fold_mean, cv_basis=cv.basis,
                  baseline_cv=baseline.headline, tag=exp.tag)
    if cfg.refit:
        scores["refit"] = dict(seeds=cfg.refit.seeds, use=cfg.refit.use,
                               note="refit models have no OOF: the CV is the k-fold models'")
    write_json(scores, run.scores)
    write_csv(oof, run.oof)
    print(f"{cfg.experiment}: CV {metrics.name(cfg.metric)} {cv.text()} (trivial baseline "
          f"{baseline.headline:.5f}; folds "
          f"{', '.join(f'{v:.4f}' for v in cv.per_fold.values())})"
          + (f"; the refit models ({cfg.refit.use}) have no OOF: this is the k-fold models' CV"
             if cfg.refit else ""), file=sys.stderr)
    if not metrics.better(cfg.metric, cv.headline, baseline.headline):
        print(f"warning: {cfg.experiment}: CV {cv.headline:.5f} does not beat the trivial "
              f"baseline's {baseline.headline:.5f} (the prior or the mean for every row): it "
              f"learned nothing usable; check train.lr, the epochs and the data", file=sys.stderr)
    return scores


def finished(fold_dir) -> bool:
    """A training folder whose stages are all done (its resume checkpoint removed)."""
    return (fold_dir / layout.BEST).is_file() and not (fold_dir / layout.LAST).is_file()


def train_rounds(exp: Experiment, fold: int, progress: Progress,
                 on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train fold `fold`: on its rows' labels, or, learning from sources, on its teacher data
    (pipeline.training.teacher), round after round of pseudo-labels (each round's in
    fold<k>/round<r>/, the last in fold<k>/). `on_epoch`: train_fold's end-of-epoch callback."""
    cfg, run = exp.cfg, exp.run
    if not cfg.sources:
        train_fold(exp, fold, run.fold(fold), progress=progress, on_epoch=on_epoch)
        return
    rounds, earlier = (cfg.pseudo.rounds if cfg.pseudo else 1), None
    for r in range(1, rounds + 1):
        fold_dir = run.fold(fold) if r == rounds else run.fold(fold) / f"round{r}"
        if r < rounds and finished(fold_dir):
            earlier = fold_dir / layout.BEST
            continue
        own = teacher.own_predictions(exp, fold, earlier) if earlier else None
        train_fold(exp, fold, fold_dir, progress=progress, on_epoch=on_epoch,
                   data=teacher.fold_data(exp, fold, own))
        if r < rounds and exp.rt.world.primary:
            (fold_dir / layout.LAST).unlink(missing_ok=True)
        exp.rt.barrier()
        earlier = fold_dir / layout.BEST


def refit_plan(plan: list[finetune.Stage], best_epochs: list[int]) -> list[finetune.Stage]:
    """The stages of a full-data refit: the folds' stages cut at the median of their best
    epochs (counted from 1, over all stages)."""
    left = max(1, int(round(float(np.median(np.asarray(best_epochs) + 1)))))
    out = []
    for stage in plan:
        if left <= 0:
            break
        out.append(finetune.Stage(min(stage.epochs, left), stage.trainable))
        left -= stage.epochs
    return out


def kept_epoch(cfg: ExperimentConfig, log: pd.DataFrame) -> int:
    """The epoch (counted from 0 over all stages) whose weights a fold kept: its best by
    validation score (the first of equals), or its last (`train.keep: last`)."""
    if cfg.train.keep == "last":
        return int(log["epoch"].iloc[-1])
    sign = 1 if metrics.higher_is_better(cfg.metric) else -1
    return int(log["epoch"].iloc[int(np.argmax(sign * log["val_metric"].to_numpy()))])


def refit(exp: Experiment, on_epoch: Callable[[int, float], None] | None = None) -> bool:
    """One model per `refit.seeds` on every train row (and pseudo-labelled test rows: see
    teacher.refit_data), for the epochs the folds needed (refit_plan); no validation rows, so
    the last epoch's weights are kept. Returns whether any was trained in this call."""
    cfg, run = exp.cfg, exp.run
    todo = [seed for seed in cfg.refit.seeds if not finished(run.refit(seed))]
    if not todo:
        return False
    best = [kept_epoch(cfg, pd.read_csv(path)) for path in run.fold_logs().values()]
    groups = finetune.layer_groups(init_model(exp, 0))
    plan = refit_plan(finetune.stage_plan(cfg, len(exp.comp.train), len(groups)), best)
    for seed in todo:
        if exp.rt.world.primary:
            print(f"{cfg.experiment}: refit on every train row, seed {seed}, stages "
                  f"{[(s.epochs, s.trainable) for s in plan]} (the folds' best epochs: {best})",
                  file=sys.stderr)
        train_fold(exp, REFIT_SEED + seed, run.refit(seed), on_epoch=on_epoch,
                   data=teacher.refit_data(exp, REFIT_SEED + seed, plan))
        if exp.rt.world.primary:
            (run.refit(seed) / layout.LAST).unlink(missing_ok=True)
        exp.rt.barrier()
    return True


def check_folds_score(exp: Experiment) -> None:
    """Refuse, before training, a fold on which the metric is undefined (a rank metric on a fold
    holding one class: its best epoch could never be chosen)."""
    if not metrics.by_fold_mean(exp.cfg.metric) or exp.comp.task.predicts != "classes":
        return
    for k in range(exp.cfg.folds.n_splits):
        present = np.unique(exp.comp.y[exp.folds == k])
        if len(present) < 2:
            raise UserError(f"{layout.folds_file(exp.cfg.name)}: fold {k} holds only class "
                            f"{exp.comp.classes[present[0]]!r}: {metrics.name(exp.cfg.metric)} is "
                            f"undefined on it; use fewer folds (folds.n_splits) or stratified folds")


def train_experiment(cfg: ExperimentConfig, only: list[int] | None = None, fresh: bool = False,
                     on_epoch: Callable[[int, float], None] | None = None) -> dict | None:
    """Train the folds not yet done (all, or those in `only`; `fresh`: start again, the finished
    version kept in the history); the run's OOF and scores once every fold is done, else None.
    `on_epoch(epoch, score)`: called after every epoch of every fold and refit (the auto mode's
    clock); an exception it raises ends training, resumable like an interruption."""
    finetune.check_finetune(cfg)
    check_pretrained(cfg.model)
    n_splits = cfg.folds.n_splits
    outside = sorted(set(only or []) - set(range(n_splits)))
    if outside:
        raise UserError(f"--fold {outside[0]}: the folds are 0 to {n_splits - 1} (folds.n_splits)")
    exp = prepare(cfg)
    check_folds_score(exp)
    run, rt = exp.run, exp.rt
    record = start_run(exp, fresh)
    todo = [k for k in (sorted(set(only)) if only else range(n_splits))
            if not run.fold_oof(k).is_file()]
    progress = Progress(len(todo) * (cfg.pseudo.rounds if cfg.pseudo else 1))
    try:
        for fold in todo:
            started = time.perf_counter()
            train_rounds(exp, fold, progress, on_epoch)
            oof = exp.fold_oof(fold)
            if rt.world.primary:
                write_csv(oof, run.fold_oof(fold))
                run.last(fold).unlink(missing_ok=True)  # resume needs it no more
                record.setdefault("fold_seconds", {})[str(fold)] = round(
                    time.perf_counter() - started, 3)
                write_json(record, run.provenance)
            rt.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{cfg.experiment}: the next train resumes at "
                                f"{resume_point(run, n_splits)}") from None
    missing = [k for k in range(n_splits) if not run.fold_oof(k).is_file()]
    if missing:
        if rt.world.primary:
            print(f"{cfg.experiment}: folds {', '.join(map(str, missing))} still to train; "
                  f"oof.csv and scores.json follow once they are done", file=sys.stderr)
        return None
    if cfg.refit:
        started = time.perf_counter()
        if refit(exp, on_epoch) and rt.world.primary:
            record["refit_seconds"] = round(time.perf_counter() - started, 3)
            write_json(record, run.provenance)
    return finish_run(exp) if rt.world.primary else None
