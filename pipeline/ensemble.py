"""Stage 4: blend experiments with optuna-tuned simplex weights -> runs/<comp>/ensemble/.

Writes weights.json (weights, mode, in-sample and nested-CV scores), test.csv (the blended
test probabilities), report.md and the optuna study (study.db, openable by optuna-dashboard).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import blend, metrics
from pipeline.artifacts import atomic_path, write_csv, write_json, write_text
from pipeline.competition import load_competition_data
from pipeline.config import EnsembleConfig, load_ensemble
from pipeline.errors import UserError, cli


@dataclass
class Member:
    name: str
    oof: pd.DataFrame  # id, fold, classes
    test: pd.DataFrame  # id, classes
    tag: str


def load_member(run_dir: Path) -> Member:
    paths = {k: run_dir / f for k, f in (("oof", "oof_tta.csv"), ("test", "test.csv"),
                                           ("scores", "scores.json"))}
    for p in paths.values():
        if not p.is_file():
            raise UserError(f"{p}: not found; train and predict experiment {run_dir.name} first")
    read = lambda p: pd.read_csv(p, dtype={"id": str}, keep_default_na=False)  # noqa: E731
    tag = json.loads(paths["scores"].read_text())["tag"]
    return Member(run_dir.name, read(paths["oof"]), read(paths["test"]), tag)


def check_compatible(members: list[Member]) -> None:
    """Refuse, naming the experiments, to blend OOF of other folds, ids or class orders."""
    ref = members[0]
    for m in members[1:]:
        pair = f"experiments {ref.name!r} and {m.name!r}"
        if ref.tag.split("-")[-1] != m.tag.split("-")[-1]:
            raise UserError(f"{pair} were trained on different fold files; retrain one of them")
        if list(ref.oof.columns) != list(m.oof.columns):
            raise UserError(f"{pair} have different class columns or order")
        if list(ref.oof["id"]) != list(m.oof["id"]) or not ref.oof["fold"].equals(m.oof["fold"]):
            raise UserError(f"{pair} have different OOF ids or folds")
        if list(ref.test["id"]) != list(m.test["id"]):
            raise UserError(f"{pair} have different test ids")


def run(cfg: EnsembleConfig) -> dict:
    comp = load_competition_data(cfg)
    members = [load_member(Path("runs") / cfg.name / e) for e in cfg.experiments]
    check_compatible(members)
    classes = list(comp.classes)
    ref = members[0]
    lookup = dict(zip(comp.train["id"], comp.target_index()))
    y = ref.oof["id"].map(lookup).to_numpy()
    folds = ref.oof["fold"].to_numpy()
    oof = np.stack([m.oof[classes].to_numpy(np.float64) for m in members])
    test = np.stack([m.test[classes].to_numpy(np.float64) for m in members])
    modes = blend.MODES if cfg.mode == "tune" else (cfg.mode,)
    names = [m.name for m in members]
    single = {n: metrics.score(cfg.metric, y, p) for n, p in zip(names, oof)}
    eq = blend.equal_weights(len(members))
    equal_cv = metrics.score(cfg.metric, y, blend.blend(oof, eq, modes[0]))

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.storage:
        storage, study_name, keep = cfg.storage, f"{cfg.name}-{cfg.experiment}", True
    else:
        db = run_dir / "study.db"
        tmp_db = run_dir / ".study.db.tmp"
        tmp_db.unlink(missing_ok=True)
        storage, study_name, keep = f"sqlite:///{tmp_db}", "blend", False
    weights, mode, tuned_cv, study = blend.tune(oof, y, cfg.metric, cfg.trials, cfg.seed, modes,
                                                storage, study_name, load_if_exists=keep)
    if not cfg.storage:
        shutil.move(tmp_db, db)
    nested = None
    choice = "tuned"
    if cfg.nested_cv and len(members) > 1:
        nested, _, nested_folds = blend.nested_cv(oof, y, folds, cfg.metric, cfg.trials, cfg.seed,
                                                  modes)
        if cfg.fallback_to_equal and not metrics.better(cfg.metric, nested, equal_cv):
            print(f"ensemble: tuned weights do not beat equal weights under nested CV "
                  f"({nested:.5f} vs {equal_cv:.5f}): using equal weights", file=sys.stderr)
            weights, mode, choice = eq, modes[0], "equal"
    cv = metrics.score(cfg.metric, y, blend.blend(oof, weights, mode))
    result = dict(metric=cfg.metric, experiments=names, weights=dict(zip(names, weights.tolist())),
                  mode=mode, choice=choice, cv=cv, tuned_in_sample_cv=tuned_cv,
                  nested_cv=nested, equal_weights_cv=equal_cv, single_cv=single,
                  best_single=max(single, key=lambda n: single[n] * (1 if metrics.HIGHER_IS_BETTER[cfg.metric] else -1)))
    blended = pd.DataFrame(blend.blend(test, weights, mode), columns=classes)
    blended.insert(0, "id", ref.test["id"])
    write_csv(blended, run_dir / "test.csv")
    write_json(result, run_dir / "weights.json")
    print(f"ensemble: CV {cfg.metric} {cv:.5f} ({choice} weights "
          f"{', '.join(f'{n}={w:.3f}' for n, w in zip(names, weights))}, mode {mode}); "
          f"nested CV {nested}, equal {equal_cv:.5f}", file=sys.stderr)
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="configs/<comp>/ensemble.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value dot-path overrides")
    args = parser.parse_args(argv)
    run(load_ensemble(args.config, args.overrides))


if __name__ == "__main__":
    main()
