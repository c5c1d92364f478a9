"""Learning from other models, fold by fold: pseudo-labelled test rows and distillation.

A source (or teacher) is another experiment or ensemble of the competition. Fold k of the
learner only ever sees predictions made by the source's fold-k models, which never saw fold
k's labels, so the learner's OOF, and its CV, stay honest:
- an experiment's fold-k model predicts the train and test rows with the view set its predict
  stage chose without fold k;
- an ensemble blends its members' fold-k predictions with the weights and mode (or the
  stack's meta-model) it chose without fold k (its nested-CV choice for fold k).
(A teacher's OOF rows would not do: another fold's OOF model was trained on fold k's labels.)
A fold trains on targets in prediction space (what `Task.activate` outputs) with a loss weight
each (`Task.soft_loss`), over a cache of the train images followed by the test images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.blending import stack
from pipeline.blending.blend import blend
from pipeline.core import layout
from pipeline.core.config import load_experiment
from pipeline.core.errors import UserError
from pipeline.data.images import image_cache
from pipeline.training.experiment import Experiment, prepare
from pipeline.training.loop import FoldData
from pipeline.training.sources import is_ensemble


@dataclass(frozen=True)
class Predictions:
    """A source's fold-k predictions, indexed by id (no train rows: a source's final test
    predictions, for a refit)."""

    train: pd.DataFrame | None
    test: pd.DataFrame


def _everywhere(exp: Experiment, model, views: str) -> Predictions:
    """`model` on every train and test row with view set `views`."""
    ps, comp = exp.predict_spec([views]), exp.comp
    train = exp.predict([model], exp.images, np.arange(len(comp.train)), ps)[views][0]
    test = exp.predict([model], exp.test_images(), np.arange(len(comp.test)), ps)[views][0]
    return Predictions(pd.DataFrame(train, index=comp.train["id"]),
                       pd.DataFrame(test, index=comp.test["id"]))


def _experiment_predictions(exp: Experiment, k: int) -> Predictions:
    """Fold k's model of a trained and predicted experiment on every train and test row, with
    the view set its predict stage chose without fold k."""
    scores = exp.trained_scores()
    if "tta_views_per_fold" not in scores:
        raise UserError(f"{exp.run.scores}: not predicted yet; run `make predict "
                        f"COMP={exp.cfg.name}` first")
    return _everywhere(exp, exp.fold_model(k), scores["tta_views_per_fold"][str(k)])


def source_predictions(comp: str, name: str, k: int, task) -> Predictions:
    """Source `name`'s fold-k predictions on `task` (see the module doc)."""
    if not is_ensemble(comp, name):
        return _experiment_predictions(prepare(load_experiment(layout.config_file(comp, name))), k)
    run = layout.Run.of(comp, name)
    record = json.loads(run.weights.read_text())
    if not record.get("nested_cv"):
        raise UserError(f"{run.weights}: no choices made without each fold (nested_cv: false); "
                        f"a learner's fold k would learn from weights chosen on fold k's labels")
    chosen = record["nested_cv"]["folds"][str(k)]
    members = [source_predictions(comp, m, k, task) for m in record["experiments"]]
    weights = np.array([chosen["weights"][m] for m in record["experiments"]])

    def blended(part: str) -> pd.DataFrame:
        frames = [getattr(p, part) for p in members]
        index = frames[0].index
        stacked = np.stack([f.loc[index].to_numpy() for f in frames])
        return pd.DataFrame(blend(stacked, weights, chosen["mode"], task,
                                  meta=stack.from_json(chosen.get("stack"))), index=index)

    return Predictions(blended("train"), blended("test"))


def fold_targets(exp: Experiment, rows: np.ndarray, key: int, source: Predictions | None,
                 teacher: Predictions | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the train + test image cache, their targets in prediction space with a loss
    weight column): train `rows` with their labels (each mixed with the teacher's prediction
    by `distill.alpha`), then the pseudo-labelled test rows the source is sure enough of
    (`pseudo`; the share drawn seeded by `key`, the fold)."""
    cfg, comp, task = exp.cfg, exp.comp, exp.comp.task
    targets = task.as_predictions(comp.y[rows], cfg.train.label_smoothing)
    if teacher is not None:
        taught = teacher.train.loc[comp.train["id"].iloc[rows]].to_numpy()
        targets = cfg.distill.alpha * taught + (1 - cfg.distill.alpha) * targets
    targets = np.c_[targets, np.ones(len(rows))]
    if source is None:
        return rows, targets.astype(np.float32)
    p = cfg.pseudo
    test = source.test.loc[comp.test["id"]].to_numpy()
    sure = np.flatnonzero(task.confidence(test) >= p.confidence)
    rng = np.random.default_rng([cfg.seed, key, 7])
    picked = np.sort(rng.permutation(sure)[:int(round(p.share * len(sure)))])
    pseudo = test[picked] if p.labels == "soft" else task.harden(test[picked])
    pseudo = np.c_[pseudo, np.full(len(picked), p.weight)]
    return (np.concatenate([rows, len(comp.train) + picked]),
            np.concatenate([targets, pseudo]).astype(np.float32))


def _with_test_images(exp: Experiment, rows: np.ndarray, targets: np.ndarray,
                      val_rows: np.ndarray, plan=None) -> FoldData:
    """FoldData over a cache of the train images followed by the test images."""
    comp = exp.comp
    images = image_cache(list(comp.train["path"]) + list(comp.test["path"]), exp.side,
                         exp.cfg.data.channels, exp.cfg.data.cache_dir)
    return FoldData(images, rows, targets, val_rows, plan)


def fold_data(exp: Experiment, k: int, round_source: Predictions | None = None) -> FoldData:
    """What fold k of a learner trains on: its pseudo-labels (from `round_source`, this
    experiment's own previous round, when given, else the configured source) and its
    teacher's targets."""
    cfg, task = exp.cfg, exp.comp.task
    source = round_source or (source_predictions(cfg.name, cfg.pseudo.source, k, task)
                              if cfg.pseudo else None)
    teacher = source_predictions(cfg.name, cfg.distill.teacher, k, task) if cfg.distill else None
    rows, targets = fold_targets(exp, np.flatnonzero(exp.folds != k), k, source, teacher)
    val_rows = np.flatnonzero(exp.folds == k)
    if source is None:
        return FoldData(exp.images, rows, targets, val_rows)
    return _with_test_images(exp, rows, targets, val_rows)


def refit_data(exp: Experiment, key: int, plan: list) -> FoldData:
    """What a full-data refit trains on: every train row, and with `pseudo`, the test rows
    pseudo-labelled from the source's final test predictions (its test.csv: a refit has no
    OOF to keep honest; one round)."""
    comp, everything = exp.comp, np.arange(len(exp.comp.train))
    if not exp.cfg.pseudo:
        return FoldData(exp.images, everything, None, everything[:0], plan)
    final = pd.read_csv(layout.Run.of(exp.cfg.name, exp.cfg.pseudo.source).test,
                        dtype={"id": str}, keep_default_na=False).set_index("id")
    rows, targets = fold_targets(exp, everything, key, Predictions(None, final[list(comp.classes)]),
                                 None)
    return _with_test_images(exp, rows, targets, everything[:0], plan)


def own_predictions(exp: Experiment, k: int, weights: Path) -> Predictions:
    """This experiment's fold-k model of an earlier round (the checkpoint `weights`) on every
    train and test row, plain views: the next round's pseudo-labels."""
    return _everywhere(exp, exp.fold_model(k, weights), "none")
