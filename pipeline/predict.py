"""Stage 3: TTA predictions of every fold model, identically on OOF rows and the test set.

Writes runs/<comp>/<exp>/oof_tta.csv (each fold's model on its validation rows), adds the
TTA CV beside the plain one in scores.json, and last test.csv (every fold's model on every
test row with the chosen views, averaged over folds: what `infer` computes from a package).
`tta.views: auto` scores each candidate view set on the OOF and keeps the best; all
candidates come from the same pass over the data.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from pipeline import experiment_report, inference, metrics, tta
from pipeline.artifacts import write_csv, write_json
from pipeline.config import ExperimentConfig, load_experiment
from pipeline.errors import UserError, cli, stage_args
from pipeline.images import image_cache
from pipeline.train import Setup, cache_batches, load_fold_model, prepare, proba_frame


def settings(s: Setup, view_sets: list[str]) -> inference.Settings:
    """The experiment's inference settings for `view_sets`."""
    return inference.experiment_settings(s.cfg, s.spec, s.comp.task, view_sets)


def predict_rows(model: torch.nn.Module, images: np.ndarray, rows: np.ndarray, s: Setup,
                 view_sets: list[str]) -> dict[str, np.ndarray]:
    """{view set: N x K probabilities} for the given cache rows, in one pass over the data.

    A loader batch holds as many images as fit `max_batch` views, so each batch's views
    go through the model in one forward pass.
    """
    st = settings(s, view_sets)
    out = inference.predict_batches([model], cache_batches(s, images, rows, st.images_per_batch),
                                    st, s.rt)
    return {v: per_model[0] for v, per_model in out.items()}


def best_view_set(metric: str, scores: dict[str, float]) -> str:
    """The best-scoring view set; ties go to the one listed first (the cheaper, by convention)."""
    best = next(iter(scores))
    for v, score in scores.items():
        if metrics.better(metric, score, scores[best]):
            best = v
    return best


def read_scores(s: Setup) -> dict:
    """The train stage's scores.json, refusing runs trained with another config or fold file."""
    run_dir = s.cfg.run_dir
    path = run_dir / "scores.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; train experiment {s.cfg.experiment} first")
    scores = json.loads(path.read_text())
    if scores.get("tag") != s.tag:
        raise UserError(f"{run_dir}: trained with {scores.get('tag')}, config is now {s.tag}; "
                        f"retrain it (`make train COMP={s.cfg.name}`)")
    for fold in range(s.cfg.folds.n_splits):
        ckpt = run_dir / f"fold{fold}" / "best.safetensors"
        if not ckpt.is_file():
            raise UserError(f"{ckpt}: not found; train experiment {s.cfg.experiment} first")
    return scores


def predict_oof(s: Setup, view_sets: list[str]) -> dict[str, np.ndarray]:
    """{view set: OOF probabilities}: each fold's model on its own validation rows."""
    oof = {v: np.zeros((len(s.comp.train), len(s.comp.classes))) for v in view_sets}
    for fold in range(s.cfg.folds.n_splits):
        model = load_fold_model(s, s.cfg.run_dir / f"fold{fold}")
        val_rows = np.flatnonzero(s.folds == fold)
        for v, p in predict_rows(model, s.images, val_rows, s, view_sets).items():
            oof[v][val_rows] = p
        print(f"{s.cfg.experiment}: fold {fold} predicted", file=sys.stderr)
    return oof


def predict_test(s: Setup, view_sets: list[str]) -> dict[str, np.ndarray]:
    """{view set: test probabilities averaged over folds}: every fold model on every test row,
    exactly as `infer` predicts them from a package."""
    cfg = s.cfg
    test_images = image_cache(list(s.comp.test["path"]), s.side, cfg.data.channels,
                              cfg.data.cache_dir)
    st = settings(s, view_sets)
    models = [load_fold_model(s, cfg.run_dir / f"fold{k}") for k in range(cfg.folds.n_splits)]
    batches = cache_batches(s, test_images, np.arange(len(s.comp.test)), st.images_per_batch)
    predicted = inference.predict_batches(models, batches, st, s.rt)
    return {v: tta.average_folds(p) for v, p in predicted.items()}


def predict_folds(s: Setup, view_sets: list[str]) -> tuple[dict, dict]:
    """({view set: OOF probabilities}, {view set: test probabilities averaged over folds}),
    all view sets from the same forward passes."""
    return predict_oof(s, view_sets), predict_test(s, view_sets)


def run(cfg: ExperimentConfig) -> dict:
    s = prepare(cfg)
    scores = read_scores(s)
    run_dir = cfg.run_dir
    candidates = list(dict.fromkeys(cfg.tta.candidates if cfg.tta.views == "auto"
                                    else [cfg.tta.views]))
    oof = predict_oof(s, candidates)
    tta_scores = {v: metrics.score(cfg.metric, s.labels, oof[v]) for v in candidates}
    best = best_view_set(cfg.metric, tta_scores)
    per_fold_tta = metrics.fold_scores(cfg.metric, s.labels, s.folds, oof[best])
    write_csv(proba_frame(s.comp.train["id"], s.folds, oof[best], s.comp.classes),
              run_dir / "oof_tta.csv")
    scores.update(cv_tta=tta_scores[best], per_fold_tta=per_fold_tta, tta_views=best,
                  task=cfg.task,
                  tta_merge=cfg.tta.merge, tta_scores=tta_scores)
    write_json(scores, run_dir / "scores.json")
    experiment_report.write(s)  # report.md and PNGs: learning curves, OOF errors
    test = predict_test(s, [best])[best]  # the chosen views only, as a package predicts
    test_df = proba_frame(s.comp.test["id"], -1, test, s.comp.classes)
    write_csv(test_df.drop(columns="fold"), run_dir / "test.csv")  # last: make's target
    print(f"{cfg.experiment}: CV {scores['metric']} {scores['cv']:.5f} without TTA, "
          f"{tta_scores[best]:.5f} with {best} ({cfg.tta.merge})", file=sys.stderr)
    return scores


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml")
    run(load_experiment(args.config, args.overrides))


if __name__ == "__main__":
    main()
