"""Deterministic k-fold splits of the train table: stratified on classes, on labels (iterative
stratification) or on quantile bins of values, grouped when a group column is given."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from pipeline.core import layout
from pipeline.core.artifacts import write_csv, write_text
from pipeline.core.competition import data_identity, load_competition_data
from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import UserError


def choose_method(method: str, has_groups: bool) -> str:
    """The split method; a method that would ignore the group column, or needs one that is
    not set, is refused."""
    if method == "auto":
        return "stratified_group" if has_groups else "stratified"
    if method in ("group", "stratified_group") and not has_groups:
        raise UserError(f"folds.method: {method} needs data.group_column to be set")
    if method in ("kfold", "stratified") and has_groups:
        raise UserError(f"folds.method: {method} ignores data.group_column (a group's rows would "
                        f"fall in several folds, and its CV leak); use group or stratified_group, "
                        f"or remove data.group_column")
    return method


def value_bins(values: np.ndarray, n_splits: int) -> np.ndarray:
    """Quantile bins of numeric targets to stratify on: as many as leave n_splits rows each
    (at most 10)."""
    n_bins = int(max(1, min(10, len(values) // (2 * n_splits))))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def multilabel_folds(targets: np.ndarray, groups: np.ndarray | None, n_splits: int, method: str,
                     seed: int) -> np.ndarray:
    """Iterative stratification (MultilabelStratifiedKFold); with groups, GroupKFold (labels are
    not stratified across groups: a note says so)."""
    x = np.zeros(len(targets))
    if groups is not None and method != "kfold":
        print("note: folds: multi-label targets with groups: GroupKFold, labels not stratified",
              file=sys.stderr)
        splits = GroupKFold(n_splits, shuffle=True, random_state=seed).split(x, None, groups)
    elif method == "kfold":
        splits = KFold(n_splits, shuffle=True, random_state=seed).split(x)
    else:
        splits = MultilabelStratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, targets)
    fold = np.full(len(targets), -1, dtype=np.int64)
    for k, (_, val) in enumerate(splits):
        fold[val] = k
    absent = [j for j in range(targets.shape[1])
              if targets[:, j].sum() >= n_splits and
              any(targets[fold == k, j].sum() == 0 for k in range(n_splits))]
    if absent and method != "kfold" and groups is None:
        raise UserError(f"folds: label {absent[0]} is missing from a fold although it has "
                        f"{int(targets[:, absent[0]].sum())} rows; use folds.method=kfold")
    return fold


def assign_folds(targets: np.ndarray, groups: np.ndarray | None, n_splits: int, method: str,
                 seed: int, strata: str = "classes") -> np.ndarray:
    """Fold number (0..k-1) per row; pure and deterministic for a given seed.

    `strata`: `classes` (stratified on the class), `labels` (N x L 0/1: iterative
    stratification) or `values` (numbers: stratified on their quantile bins).
    """
    method = choose_method(method, groups is not None)
    if groups is not None and len(np.unique(groups)) < n_splits:
        raise UserError(f"folds.n_splits: {n_splits} folds but only {len(np.unique(groups))} groups")
    if strata == "labels":
        return multilabel_folds(targets, groups, n_splits, method, seed)
    if strata == "values":
        targets = value_bins(targets, n_splits)
    if method in ("stratified", "stratified_group"):
        labels, counts = np.unique(targets, return_counts=True)
        if counts.min() < n_splits:
            rare = str(labels[counts.argmin()])
            raise UserError(
                f"folds.n_splits: {n_splits} folds but class {rare!r} has only {counts.min()} "
                f"rows; lower folds.n_splits or use folds.method=kfold"
            )
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


def fold_table(ids, targets, groups, n_splits: int, method: str, seed: int,
               strata: str = "classes") -> pd.DataFrame:
    folds = assign_folds(np.asarray(targets), None if groups is None else np.asarray(groups),
                         n_splits, method, seed, strata)
    return pd.DataFrame({"id": list(ids), "fold": folds})


def read_folds(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: fold file not found; run `make folds COMP=...` first")
    return pd.read_csv(path, dtype={"id": str, "fold": np.int64}, keep_default_na=False)


def write_data_stamps(cfg: CompetitionConfig) -> None:
    """runs/<comp>/{train,test}-data.json, each rewritten only when its data changed (make
    rebuilds what depends on it, and nothing else)."""
    identity = data_identity(load_competition_data(cfg))
    for split, digest in identity.items():
        path = layout.data_stamp(cfg.name, split)
        text = json.dumps({"hash": digest}) + "\n"
        if path.is_file() and path.read_text() != text:
            print(f"{path}: the {split} data changed: what depends on it is rebuilt",
                  file=sys.stderr)
        if not path.is_file() or path.read_text() != text:
            write_text(text, path)


def write_folds(cfg: CompetitionConfig) -> Path:
    """folds/<comp>.csv for the competition: each train row's fold, stratified as its task
    says; returns its path."""
    comp = load_competition_data(cfg)
    groups = comp.train["group"] if cfg.data.group_column else None
    targets, strata = comp.task.fold_strata(comp.train["target"], comp.y)
    table = fold_table(comp.train["id"], targets, groups, cfg.folds.n_splits,
                       cfg.folds.method, cfg.seed, strata)
    out = layout.folds_file(cfg.name)
    write_csv(table, out)
    sizes = table["fold"].value_counts().sort_index().tolist()
    print(f"wrote {out}: {len(table)} rows, fold sizes {sizes}", file=sys.stderr)
    return out
