"""A prepared experiment: what training, prediction and tuning share, resolved once.

The competition's data and the fold of every train row, the model's input spec and the uint8
image cache at its side, the run's tag (the identity its artifacts are built under) and the
runtime (pipeline.runtime.device). Its methods feed cache rows through the one inference path
(pipeline.models.predictor).
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core import layout
from pipeline.core.artifacts import file_hash
from pipeline.core.competition import Competition, data_identity, load_competition_data
from pipeline.core.config import ExperimentConfig, config_hash
from pipeline.core.errors import UserError
from pipeline.core.splits import read_folds
from pipeline.data.images import image_cache
from pipeline.data.loader import CachedImages, make_loader
from pipeline.models import tta
from pipeline.models.factory import InputSpec, experiment_input
from pipeline.models.predictor import (FoldModel, PredictSpec, experiment_spec, load_model,
                                       predict_batches)
from pipeline.runtime import device
from pipeline.runtime.device import Runtime
from pipeline.training import sources


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Experiment:
    """Everything a fold needs, resolved once per experiment."""

    cfg: ExperimentConfig
    comp: Competition
    folds: np.ndarray  # fold per train row
    images: np.ndarray  # cached uint8 images, one per train row
    side: int  # their side: image_size / crop_pct
    spec: InputSpec
    tag: str  # config, fold-file and data hashes; artifacts built from another tag are stale
    rt: Runtime  # where tensors run

    @property
    def run(self) -> layout.Run:
        return layout.Run.of(self.cfg.name, self.cfg.experiment)

    def predict_spec(self, view_sets: list[str]) -> PredictSpec:
        """How this experiment predicts `view_sets`."""
        return experiment_spec(self.cfg, self.spec, self.comp.task, view_sets)

    def batches(self, images: np.ndarray, rows: np.ndarray, batch: int):
        """Cache rows as uint8 batches of `batch` whole cached images, in order."""
        loader = make_loader(CachedImages(images, rows, None), batch, False,
                             self.cfg.train.num_workers, 0, **self.rt.loader_options())
        return (x for x, _ in loader)

    def predict(self, models: list[FoldModel], images: np.ndarray, rows: np.ndarray,
                ps: PredictSpec) -> dict[str, list[np.ndarray]]:
        """{view set: one prediction array per model} of cache `rows` (the one inference path)."""
        return predict_batches(models, self.batches(images, rows, ps.images_per_batch), ps, self.rt)

    def predict_plain(self, model: FoldModel, rows: np.ndarray) -> np.ndarray:
        """The task's predictions (float64: probabilities, or values) of the centre crops of
        train cache `rows`, `train.eval_batch_size` at a time: the validation pass.

        Under torchrun each rank predicts its share of the rows and every rank gets them all.
        """
        plain = dataclasses.replace(self.predict_spec(["none"]), merge="mean",
                                    max_batch=self.cfg.train.eval_batch_size)
        shard = self.rt.shard(rows)
        if not len(shard):  # under torchrun, a rank with no rows of its own
            return self.rt.gather_rows(np.zeros((0, len(self.comp.classes))))
        model.module.eval()
        return self.rt.gather_rows(self.predict([model], self.images, shard, plain)["none"][0])

    def fold_model(self, k: int, weights: Path | None = None) -> FoldModel:
        """Fold `k`'s model with its best weights (or those at `weights`), on the run's
        device, ready to predict."""
        return load_model(self.predict_spec(["none"]), weights or self.run.best(k), self.rt.device)

    def frame(self, ids, fold, pred: np.ndarray) -> pd.DataFrame:
        """Predictions as oof.csv and test.csv hold them: id, fold, a column per class."""
        df = pd.DataFrame(pred, columns=list(self.comp.classes))
        df.insert(0, "fold", fold)
        df.insert(0, "id", list(ids))
        return df

    def trained_scores(self) -> dict:
        """The train stage's scores.json, refusing a run trained with another config or fold
        file, or missing a fold's checkpoint."""
        run = self.run
        if not run.scores.is_file():
            raise UserError(f"{run.scores}: not found; train experiment {self.cfg.experiment} first")
        scores = json.loads(run.scores.read_text())
        if scores.get("tag") != self.tag:
            raise UserError(f"{run.dir}: trained with {scores.get('tag')}, config is now "
                            f"{self.tag}; retrain it (`make train COMP={self.cfg.name}`)")
        for path in [run.best(k) for k in range(self.cfg.folds.n_splits)] + \
                list(self.test_checkpoints().values()):
            if not path.is_file():
                raise UserError(f"{path}: not found; train experiment "
                                f"{self.cfg.experiment} first")
        return scores

    def predict_oof(self, view_sets: list[str]) -> dict[str, np.ndarray]:
        """{view set: OOF predictions}: each fold's model on its own validation rows, all view
        sets from the same forward passes."""
        ps = self.predict_spec(view_sets)
        oof = {v: np.zeros((len(self.comp.train), len(self.comp.classes))) for v in view_sets}
        for k in range(self.cfg.folds.n_splits):
            rows = np.flatnonzero(self.folds == k)
            for v, per_model in self.predict([self.fold_model(k)], self.images, rows, ps).items():
                oof[v][rows] = per_model[0]
            print(f"{self.cfg.experiment}: fold {k} predicted", file=sys.stderr)
        return oof

    def test_checkpoints(self) -> dict[str, Path]:
        """{name: best weights} of the models that predict the test set: fold<k> for every
        fold, and refit<seed> for every full-data refit (instead of the folds' with
        `refit.use: replace`); each counts alike in the mean."""
        cfg, run = self.cfg, self.run
        folds = {f"fold{k}": run.best(k) for k in range(cfg.folds.n_splits)}
        if not cfg.refit:
            return folds
        refits = {run.refit(s).name: run.refit(s) / layout.BEST for s in cfg.refit.seeds}
        return refits if cfg.refit.use == "replace" else {**folds, **refits}

    def test_images(self) -> np.ndarray:
        """The test images' cache at the experiment's side."""
        return image_cache(list(self.comp.test["path"]), self.side, self.cfg.data.channels,
                           self.cfg.data.cache_dir)

    def predict_test(self, view_sets: list[str]) -> dict[str, np.ndarray]:
        """{view set: test predictions averaged over the test models (test_checkpoints)}:
        every one on every test row, exactly as `infer` predicts them from a package."""
        models = [self.fold_model(0, path) for path in self.test_checkpoints().values()]
        predicted = self.predict(models, self.test_images(), np.arange(len(self.comp.test)),
                                 self.predict_spec(view_sets))
        return {v: tta.average_folds(p) for v, p in predicted.items()}

    def fold_oof(self, k: int, weights: Path | None = None) -> pd.DataFrame:
        """Fold `k`'s OOF rows: its best weights (or those at `weights`) on its validation rows."""
        rows = np.flatnonzero(self.folds == k)
        pred = self.predict_plain(self.fold_model(k, weights), rows)
        return self.frame(self.comp.train["id"].iloc[rows], k, pred)


def run_tag(cfg: ExperimentConfig, comp: Competition) -> str:
    """The run's identity: its resolved config (less TTA, which needs no retraining, and the
    device, which does not change what is trained), the fold file's bytes and the train data
    (targets and image files): `<config>-<folds>-<data>`, and `-<sources>` for an experiment
    learning from others (pipeline.training.sources)."""
    tag = (f"{config_hash(cfg, exclude={'tta', 'device'})}-{file_hash(layout.folds_file(cfg.name))}"
           f"-{data_identity(comp)['train']}")
    return f"{tag}-{sources.identity(cfg)}" if cfg.sources else tag


def prepare(cfg: ExperimentConfig, rt: Runtime | None = None) -> Experiment:
    """The experiment's data, folds, input spec and image cache, on `rt` (default: the
    config's device and precision). Under torchrun every rank reads them; the first to need
    the image cache or the decode check builds it while the others wait on its file lock
    (`data.images.build_lock`, no collective that could time out), then all meet at a barrier."""
    rt = rt or device.runtime(cfg.device, cfg.train.precision, cfg.train.deterministic)
    rt.keep_freed_memory()
    comp = load_competition_data(cfg)
    path = layout.folds_file(cfg.name)
    fold_df = read_folds(path)
    lookup = dict(zip(fold_df["id"], fold_df["fold"]))
    missing = [i for i in comp.train["id"] if i not in lookup]
    if missing or len(lookup) != len(comp.train):
        raise UserError(f"{path}: ids do not match the train table (e.g. {missing[:1]}); "
                        f"rerun `make folds COMP={cfg.name}`")
    folds = comp.train["id"].map(lookup).to_numpy(np.int64)
    spec, side = experiment_input(cfg, comp.task.n_outputs)
    images = image_cache(list(comp.train["path"]), side, cfg.data.channels, cfg.data.cache_dir)
    rt.barrier()
    return Experiment(cfg, comp, folds, images, side, spec, run_tag(cfg, comp), rt)
