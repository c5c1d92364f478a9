"""An ensemble's members: each experiment's OOF (with TTA) and test predictions, checked to be
blendable (same fold file, folds, ids and columns) and aligned row for row."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.core import layout
from pipeline.core.competition import load_competition_data
from pipeline.core.config import EnsembleConfig
from pipeline.core.errors import UserError


@dataclass
class Member:
    name: str
    oof: pd.DataFrame  # id, fold, one probability column per class
    test: pd.DataFrame  # id, one probability column per class
    fold_hash: str  # hash of the fold file the experiment was trained on


def load_member(run: layout.Run) -> Member:
    paths = dict(oof=run.oof_tta, test=run.test, scores=run.scores)
    for p in paths.values():
        if not p.is_file():
            raise UserError(f"{p}: not found; train and predict experiment {run.name} first")
    tag = json.loads(paths["scores"].read_text()).get("tag")
    if not tag:
        raise UserError(f"{paths['scores']}: no 'tag'; retrain experiment {run.name}")
    tables = {}
    for part, needed in (("oof", ["id", "fold"]), ("test", ["id"])):
        df = pd.read_csv(paths[part], dtype={"id": str}, keep_default_na=False)
        if not set(needed) <= set(df.columns):
            raise UserError(f"{paths[part]}: needs columns {needed}; "
                            f"rerun predict for {run.name}")
        dup = df["id"].duplicated()
        if dup.any():
            raise UserError(f"{paths[part]}: duplicate id {df['id'][dup].iloc[0]!r}")
        tables[part] = df
    return Member(run.name, tables["oof"], tables["test"], tag.split("-")[1])


def classes_of(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("id", "fold")]


def _id_difference(a: pd.Series, b: pd.Series) -> str | None:
    only = set(a).symmetric_difference(b)
    return f"{len(only)} ids in only one of them, e.g. {min(only)!r}" if only else None


def align(members: list[Member], classes: list[str]) -> list[Member]:
    """Check the experiments can be blended; return them with rows in the first one's order.

    Refuses, naming both experiments, OOF from different fold files or fold assignments,
    different OOF or test ids, and different class columns or class order.
    """
    ref = members[0]
    aligned = [ref]
    for m in members[1:]:
        pair = f"experiments {ref.name!r} and {m.name!r}"
        if m.fold_hash != ref.fold_hash:
            raise UserError(f"{pair} were trained on different fold files; retrain one of them")
        for part in ("oof", "test"):
            a, b = getattr(ref, part), getattr(m, part)
            if classes_of(a) != classes_of(b):
                raise UserError(f"{pair} have different {part} class columns or order: "
                                f"{classes_of(a)} vs {classes_of(b)}")
            diff = _id_difference(a["id"], b["id"])
            if diff:
                raise UserError(f"{pair} have different {part} ids ({diff})")
        oof = m.oof.set_index("id").loc[ref.oof["id"]].reset_index()
        test = m.test.set_index("id").loc[ref.test["id"]].reset_index()
        if not np.array_equal(oof["fold"].to_numpy(), ref.oof["fold"].to_numpy()):
            raise UserError(f"{pair} assign some OOF ids to different folds; retrain one of them")
        aligned.append(Member(m.name, oof, test, m.fold_hash))
    for part in ("oof", "test"):
        if classes_of(getattr(ref, part)) != classes:
            raise UserError(f"experiment {ref.name!r}: {part} class columns "
                            f"{classes_of(getattr(ref, part))} differ from the competition's "
                            f"classes {classes}; rerun its predict stage")
    return aligned


def targets(member: Member, train: pd.DataFrame, y_train: np.ndarray) -> np.ndarray:
    """Class indices of the OOF rows, looked up in the train table by id."""
    index = pd.Index(train["id"]).get_indexer(member.oof["id"])
    if (index < 0).any():
        missing = member.oof["id"][index < 0].iloc[0]
        raise UserError(f"experiment {member.name!r}: OOF id {missing!r} is not in the train table")
    return y_train[index]


@dataclass
class Inputs:
    names: list[str]
    classes: list[str]
    y: np.ndarray  # targets of the OOF rows (Task.targets)
    folds: np.ndarray  # (N,) fold of each OOF row
    oof: np.ndarray  # (M, N, K) OOF probabilities
    test: np.ndarray  # (M, T, K) test probabilities
    test_ids: np.ndarray  # (T,)
    task: object  # pipeline.core.tasks.Task


def load_inputs(cfg: EnsembleConfig) -> Inputs:
    if len(set(cfg.experiments)) != len(cfg.experiments):
        raise UserError(f"experiments: {cfg.experiments} names an experiment twice")
    comp = load_competition_data(cfg)
    classes = list(comp.classes)
    members = align([load_member(layout.Run.of(cfg.name, e)) for e in cfg.experiments], classes)
    return Inputs([m.name for m in members], classes,
                  targets(members[0], comp.train, comp.y),
                  members[0].oof["fold"].to_numpy(),
                  np.stack([m.oof[classes].to_numpy(np.float64) for m in members]),
                  np.stack([m.test[classes].to_numpy(np.float64) for m in members]),
                  members[0].test["id"].to_numpy(), comp.task)
