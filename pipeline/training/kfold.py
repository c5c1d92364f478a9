"""An experiment trained on every fold: the folds not yet done, then the run's OOF and scores.

The run folder is the experiment's current version (pipeline.core.history): a finished run of
another tag moves to the history first. provenance.json records what built it and each
fold's wall time; config.json its resolved config.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pandas as pd

from pipeline.core import history, layout, metrics, provenance
from pipeline.core.artifacts import write_csv, write_json, write_text
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.models import finetune
from pipeline.models.pretrained import check_pretrained
from pipeline.training.checkpoints import resume_point
from pipeline.training.experiment import Experiment, prepare
from pipeline.training.loop import Progress, train_fold


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
    write_json(scores, run.scores)
    write_csv(oof, run.oof)
    print(f"{cfg.experiment}: CV {metrics.name(cfg.metric)} {cv.text()} (trivial baseline "
          f"{baseline.headline:.5f}; folds "
          f"{', '.join(f'{v:.4f}' for v in cv.per_fold.values())})", file=sys.stderr)
    if not metrics.better(cfg.metric, cv.headline, baseline.headline):
        print(f"warning: {cfg.experiment}: CV {cv.headline:.5f} does not beat the trivial "
              f"baseline's {baseline.headline:.5f} (the prior or the mean for every row): it "
              f"learned nothing usable; check train.lr, the epochs and the data", file=sys.stderr)
    return scores


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


def train_experiment(cfg: ExperimentConfig, only: list[int] | None = None,
                     fresh: bool = False) -> dict | None:
    """Train the folds not yet done (all, or those in `only`; `fresh`: start again, the finished
    version kept in the history); the run's OOF and scores once every fold is done, else None."""
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
    progress = Progress(len(todo))
    try:
        for fold in todo:
            started = time.perf_counter()
            train_fold(exp, fold, run.fold(fold), progress=progress)
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
    if not rt.world.primary:
        return None
    missing = [k for k in range(n_splits) if not run.fold_oof(k).is_file()]
    if missing:
        print(f"{cfg.experiment}: folds {', '.join(map(str, missing))} still to train; oof.csv and "
              f"scores.json follow once they are done", file=sys.stderr)
        return None
    return finish_run(exp)
