"""Every experiment of a competition and every kept past version, side by side, sorted by CV:
rows from each run folder's scores, config and provenance (and past versions' under
history/<tag>/), blend weights from the ensembles' weights.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import layout, metrics, provenance
from pipeline.core.artifacts import write_csv, write_text
from pipeline.core.config import CompetitionConfig, ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.core.history import versions

COLUMNS = ["rank", "experiment", "version", "cv_tta", "cv", "fold_std", "metric", "tta_views",
           "blend_weight", "backbone", "image_size", "epochs", "train_min", "changes", "code"]
CHANGES_SHOWN = 6  # changed keys listed per row; the rest are counted


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a.b.c': leaf} of a nested dict; lists stay whole."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(config: dict, base: dict) -> str:
    """`key=value` for every leaf of `config` that differs from `base` (`experiment` aside)."""
    ours, theirs = flatten(config), flatten(base)
    diff = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in ours.items()
            if k != "experiment" and theirs.get(k, object()) != v]
    more = len(diff) - CHANGES_SHOWN
    return " ".join(diff[:CHANGES_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def defaults_of(config: dict, competition: dict) -> dict:
    """What an experiment starts from: the competition file's settings, every experiment
    section at its default, the same backbone (it has its own column)."""
    return ExperimentConfig.model_validate(
        {**competition, "experiment": config["experiment"],
         "model": {"backbone": config["model"]["backbone"]}}).model_dump(mode="json")


def epochs_of(config: dict) -> int:
    stages = (config.get("finetune") or {}).get("stages")
    return sum(st["epochs"] for st in stages) if stages else config["train"]["epochs"]


def train_minutes(run: layout.Run, prov: dict) -> float | None:
    """Wall time of the folds (provenance), else the sum of the logged epoch times."""
    seconds = prov.get("fold_seconds")
    if not seconds:
        logs = [pd.read_csv(p)["seconds"].sum() for p in run.fold_logs().values()]
        seconds = {"logs": sum(logs)} if logs else None
    return round(sum(seconds.values()) / 60, 2) if seconds else None


def blend_weights(runs: list[layout.Run], run: layout.Run) -> dict[Path, str]:
    """{version folder: its weight} for `run`'s experiment in each ensemble among `runs`
    (several: joined by '/'), given to the version the ensemble blended: the newest one
    predicted before the ensemble ran."""
    found: dict[Path, list[str]] = {}
    for ensemble in runs:
        if not ensemble.weights.is_file():
            continue
        weight = _read(ensemble.weights).get("weights", {}).get(run.name)
        built = ensemble.weights.stat().st_mtime_ns
        predicted = [(v.test.stat().st_mtime_ns, v.dir) for v in [run, *versions(run)]
                     if v.test.is_file() and v.test.stat().st_mtime_ns <= built]
        if weight is not None and predicted:
            found.setdefault(max(predicted)[1], []).append(f"{weight:.3f}")
    return {folder: "/".join(ws) for folder, ws in found.items()}


def version_row(run: layout.Run, experiment: str, version: str, base: dict | None,
                competition: dict, weight: str | None) -> dict | None:
    """One leaderboard row from a run folder (None while it has no scores); `base`: the config
    its changes are shown against (None: the competition's defaults)."""
    scores = _read(run.scores)
    config = _read(run.config)
    if not scores or not config:
        return None
    prov = _read(run.provenance)
    folds = scores.get("per_fold_tta") or scores["per_fold"]
    return dict(experiment=experiment, version=version, cv_tta=scores.get("cv_tta"),
                cv=scores["cv"], fold_std=float(np.std(list(folds.values()))),
                metric=scores["metric"], tta_views=scores.get("tta_views"), blend_weight=weight,
                backbone=config["model"]["backbone"], image_size=config["image_size"],
                epochs=epochs_of(config), train_min=train_minutes(run, prov),
                changes=changes(config, base if base is not None else defaults_of(config, competition)),
                code=(provenance.code_changed(prov) or "") if prov else "no provenance")


def rows(comp: str, competition: dict) -> list[dict]:
    """A row per experiment's current version (its changes shown against the competition's
    defaults) and per past version (against the current config)."""
    folder = layout.competition_runs(comp)
    runs = [layout.Run(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []
    out = []
    for run in runs:
        current = _read(run.config)
        weights = blend_weights(runs, run)
        row = version_row(run, run.name, "current", None, competition, weights.get(run.dir))
        out += [row] if row else []
        for past in versions(run):
            row = version_row(past, run.name, past.name, current or None, competition,
                              weights.get(past.dir))
            out += [row] if row else []
    return out


def table(found: list[dict], metric: str) -> pd.DataFrame:
    """The rows ranked by CV (with TTA where predicted) in the metric's direction; rows scored
    with another metric follow, unranked."""
    df = pd.DataFrame(found, columns=COLUMNS[1:])
    df["sort_key"] = df["cv_tta"].fillna(df["cv"]).astype(float)
    same = df["metric"] == metric
    ranked = df[same].sort_values("sort_key", ascending=not metrics.higher_is_better(metric),
                                  kind="stable")
    ranked.insert(0, "rank", pd.array(range(1, len(ranked) + 1), dtype="Int64"))
    return pd.concat([ranked, df[~same]])[COLUMNS].reset_index(drop=True)


def markdown(df: pd.DataFrame, title: str) -> str:
    def cell(column: str, v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if column == "train_min" else f"{v:.5f}"
        return str(v).replace("|", "\\|")

    lines = [f"# {title}", "", "| " + " | ".join(df.columns) + " |",
             "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(df.columns, r)) + " |"
              for r in df.astype(object).itertuples(index=False)]
    return "\n".join(lines) + "\n"


def build(competition: CompetitionConfig) -> tuple[pd.DataFrame, str]:
    """The competition's leaderboard, written as leaderboard.csv and .md; returns both."""
    comp, metric = competition.name, metrics.name(competition.metric)
    found = rows(comp, competition.model_dump(mode="json"))
    if not found:
        raise UserError(f"{layout.competition_runs(comp)}: no trained experiment yet; run "
                        f"`make train COMP={comp}` first")
    df = table(found, metric)
    md = markdown(df, f"Leaderboard of {comp} ({metric}, "
                      f"{'higher' if metrics.higher_is_better(metric) else 'lower'} is better)")
    md_path, csv_path = layout.leaderboard_files(comp)
    write_csv(df, csv_path, float_format="%.6g")
    write_text(md, md_path)
    return df, md
