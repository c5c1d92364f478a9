"""Stage 1: deterministic k-fold split of the train table -> folds/<comp>.csv (id, fold)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold, GroupKFold

from pipeline.artifacts import write_csv
from pipeline.competition import load_competition_data
from pipeline.config import load_competition
from pipeline.errors import UserError, cli, stage_args


def choose_method(method: str, has_groups: bool) -> str:
    if method == "auto":
        return "stratified_group" if has_groups else "stratified"
    if method in ("group", "stratified_group") and not has_groups:
        raise UserError(f"folds.method: {method} needs data.group_column to be set")
    return method


def assign_folds(targets: np.ndarray, groups: np.ndarray | None, n_splits: int, method: str,
                 seed: int) -> np.ndarray:
    """Fold number (0..k-1) per row; pure and deterministic for a given seed."""
    method = choose_method(method, groups is not None)
    if method in ("stratified", "stratified_group"):
        labels, counts = np.unique(targets, return_counts=True)
        if counts.min() < n_splits:
            rare = str(labels[counts.argmin()])
            raise UserError(
                f"folds.n_splits: {n_splits} folds but class {rare!r} has only {counts.min()} "
                f"rows; lower folds.n_splits or use folds.method=kfold"
            )
    if groups is not None and len(np.unique(groups)) < n_splits:
        raise UserError(f"folds.n_splits: {n_splits} folds but only {len(np.unique(groups))} groups")
    x = np.zeros(len(targets))
    if method == "kfold":
        splits = KFold(n_splits, shuffle=True, random_state=seed).split(x)
    elif method == "stratified":
        splits = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, targets)
    elif method == "group":
        splits = GroupKFold(n_splits, shuffle=True, random_state=seed).split(x, targets, groups)
    else:
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(x, targets, groups)
    fold = np.full(len(targets), -1, dtype=np.int64)
    for k, (_, val) in enumerate(splits):
        fold[val] = k
    return fold


def fold_table(ids, targets, groups, n_splits: int, method: str, seed: int) -> pd.DataFrame:
    folds = assign_folds(np.asarray(targets), None if groups is None else np.asarray(groups),
                         n_splits, method, seed)
    return pd.DataFrame({"id": list(ids), "fold": folds})


def read_folds(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: fold file not found; run `make folds COMP=...` first")
    return pd.read_csv(path, dtype={"id": str, "fold": np.int64}, keep_default_na=False)


def folds_path(comp: str) -> Path:
    return Path("folds") / f"{comp}.csv"


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml")
    cfg = load_competition(args.config, args.overrides)
    comp = load_competition_data(cfg)
    groups = comp.train["group"] if cfg.data.group_column else None
    table = fold_table(comp.train["id"], comp.train["target"], groups, cfg.folds.n_splits,
                       cfg.folds.method, cfg.seed)
    out = folds_path(cfg.name)
    write_csv(table, out)
    sizes = table["fold"].value_counts().sort_index().tolist()
    print(f"wrote {out}: {len(table)} rows, fold sizes {sizes}", file=sys.stderr)


if __name__ == "__main__":
    main()
