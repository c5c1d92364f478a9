"""Stage 3: TTA predictions of every fold model, identically on OOF rows and the test set.

Writes runs/<comp>/<exp>/oof_tta.csv (each fold's model on its validation rows),
test.csv (every fold's model on every test row, averaged over folds) and adds the TTA
CV to scores.json. `tta.views: auto` scores each candidate view set on the OOF and keeps
the best.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd
import torch

from pipeline import metrics, tta
from pipeline.artifacts import write_csv, write_json
from pipeline.config import ExperimentConfig, load_experiment
from pipeline.data import CachedImages, make_loader, normalize
from pipeline.errors import UserError, cli
from pipeline.images import image_cache
from pipeline.models import cache_size
from pipeline.train import Setup, load_fold_model, prepare, proba_frame


def tta_proba(model, images: np.ndarray, rows: np.ndarray, s: Setup, view_sets: list[str]) -> dict:
    """{view_set: N x K probabilities} for the given cache rows, one pass over the data."""
    ds = CachedImages(images, rows, None)
    loader = make_loader(ds, s.cfg.train.eval_batch_size, False, s.cfg.train.num_workers, 0)
    out = {v: [] for v in view_sets}
    with torch.inference_mode():
        for x, _ in loader:
            x = normalize(x, s.spec)
            for v in view_sets:
                out[v].append(tta.predict_views(model, x, s.cfg.image_size, v, s.cfg.tta.merge))
    return {v: torch.cat(p).numpy().astype(np.float64) for v, p in out.items()}


def run(cfg: ExperimentConfig) -> dict:
    s = prepare(cfg)
    run_dir = cfg.run_dir
    scores_path = run_dir / "scores.json"
    if not scores_path.is_file():
        raise UserError(f"{scores_path}: not found; train the experiment first")
    scores = json.loads(scores_path.read_text())
    if scores.get("tag") != s.tag:
        raise UserError(f"{run_dir}: trained with {scores.get('tag')}, config is now {s.tag}; "
                        f"retrain it")
    candidates = list(cfg.tta.candidates) if cfg.tta.views == "auto" else [cfg.tta.views]
    side = cache_size(cfg.image_size, s.spec.crop_pct)
    test_images = image_cache(list(s.comp.test["path"]), side, cfg.data.channels, cfg.data.cache_dir)
    n, k = len(s.comp.train), len(s.comp.classes)
    oof = {v: np.zeros((n, k)) for v in candidates}
    test = {v: [] for v in candidates}
    for fold in range(cfg.folds.n_splits):
        model = load_fold_model(s, run_dir / f"fold{fold}")
        rows = np.flatnonzero(s.folds == fold)
        for v, p in tta_proba(model, s.images, rows, s, candidates).items():
            oof[v][rows] = p
        all_rows = np.arange(len(s.comp.test))
        for v, p in tta_proba(model, test_images, all_rows, s, candidates).items():
            test[v].append(p)
        print(f"{cfg.experiment}: fold {fold} predicted", file=sys.stderr)
    tta_scores = {v: metrics.score(cfg.metric, s.labels, oof[v]) for v in candidates}
    best = candidates[0]
    for v in candidates[1:]:
        if metrics.better(cfg.metric, tta_scores[v], tta_scores[best]):
            best = v
    write_csv(proba_frame(s.comp.train["id"], s.folds, oof[best], s.comp.classes),
              run_dir / "oof_tta.csv")
    test_df = proba_frame(s.comp.test["id"], -1, tta.average_folds(test[best]), s.comp.classes)
    write_csv(test_df.drop(columns="fold"), run_dir / "test.csv")
    scores.update(tta_views=best, cv_tta=tta_scores[best], tta_scores=tta_scores)
    write_json(scores, scores_path)
    print(f"{cfg.experiment}: CV {cfg.metric} {scores['cv']:.5f} without TTA, "
          f"{tta_scores[best]:.5f} with {best}", file=sys.stderr)
    return scores


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="configs/<comp>/<experiment>.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value dot-path overrides")
    args = parser.parse_args(argv)
    run(load_experiment(args.config, args.overrides))


if __name__ == "__main__":
    main()
