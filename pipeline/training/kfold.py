"""An experiment trained on every fold: the folds not yet done, then the run's OOF and scores.

The run folder is the experiment's current version (pipeline.core.history): a finished run of
another tag moves to the history first. provenance.json records what built it and each
fold's wall time; config.json its resolved config.
"""
from __future__ import annotations

import json
import sys
import time

import pandas as pd

from pipeline.core import history, metrics, provenance
from pipeline.core.artifacts import write_csv, write_json, write_text
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.models import finetune
from pipeline.models.pretrained import check_pretrained
from pipeline.training.checkpoints import resume_point
from pipeline.training.experiment import Experiment, prepare
from pipeline.training.loop import Progress, train_fold


def start_run(exp: Experiment) -> dict:
    """Make the run folder this version's (rank 0) and write its config and provenance;
    returns the provenance record (a resumed run keeps the times of the folds already done)."""
    run, rt, record = exp.run, exp.rt, {}
    if rt.world.primary:
        print(f"{exp.cfg.experiment}: training on {rt.describe()}", file=sys.stderr)
        record = provenance.collect(rt.device_name(), rt.precision, rt.world.size)
        history.start_version(run, exp.tag)
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
    per_fold = metrics.fold_scores(cfg.metric, comp.task, comp.y, exp.folds, pred)
    cv = metrics.score(cfg.metric, comp.task, comp.y, pred, ids=oof["id"])
    baseline = metrics.score(cfg.metric, comp.task, comp.y, comp.task.baseline(comp.y),
                             ids=oof["id"])
    scores = dict(metric=metrics.name(cfg.metric), per_fold=per_fold, cv=cv,
                  baseline_cv=baseline, tag=exp.tag)
    write_json(scores, run.scores)
    write_csv(oof, run.oof)
    print(f"{cfg.experiment}: CV {metrics.name(cfg.metric)} {cv:.5f} (trivial baseline "
          f"{baseline:.5f}; folds "
          f"{', '.join(f'{v:.4f}' for v in per_fold.values())})", file=sys.stderr)
    return scores


def train_experiment(cfg: ExperimentConfig, only: list[int] | None = None) -> dict | None:
    """Train the folds not yet done (all, or those in `only`); the run's OOF and scores once
    every fold is done, else None."""
    finetune.check_finetune(cfg)
    check_pretrained(cfg.model)
    n_splits = cfg.folds.n_splits
    outside = sorted(set(only or []) - set(range(n_splits)))
    if outside:
        raise UserError(f"--fold {outside[0]}: the folds are 0 to {n_splits - 1} (folds.n_splits)")
    exp = prepare(cfg)
    run, rt = exp.run, exp.rt
    record = start_run(exp)
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
