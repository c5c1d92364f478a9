"""Every experiment of a competition and every kept past version, side by side, sorted by CV.

Reads runs/<comp>/<exp>/{scores,config,provenance}.json, the same files of each past version
under history/<tag>/, and the ensembles' weights.json; writes runs/<comp>/leaderboard.md and
leaderboard.csv and prints the table.

    python -m pipeline.leaderboard configs/<comp>/competition.yaml
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics, provenance
from pipeline.artifacts import write_csv, write_text
from pipeline.config import CompetitionConfig, ExperimentConfig, load_competition
from pipeline.errors import UserError, cli, stage_args
from pipeline.runs import versions

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


def train_minutes(run_dir: Path, prov: dict) -> float | None:
    """Wall time of the folds (provenance), else the sum of the logged epoch times."""
    seconds = prov.get("fold_seconds")
    if not seconds:
        logs = [pd.read_csv(p)["seconds"].sum() for p in run_dir.glob("fold*/log.csv")]
        seconds = {"logs": sum(logs)} if logs else None
    return round(sum(seconds.values()) / 60, 2) if seconds else None


def blend_weights(comp_runs: Path, run_dir: Path) -> dict[Path, str]:
    """{version folder: its weight} for `run_dir`'s experiment in each ensemble of the
    competition (several: joined by '/'), given to the version the ensemble blended: the
    newest one predicted before the ensemble ran."""
    found: dict[Path, list[str]] = {}
    for path in sorted(comp_runs.glob("*/weights.json")):
        weight = _read(path).get("weights", {}).get(run_dir.name)
        built = path.stat().st_mtime_ns
        predicted = [((f / "test.csv").stat().st_mtime_ns, f) for f in [run_dir, *versions(run_dir)]
                     if (f / "test.csv").is_file() and (f / "test.csv").stat().st_mtime_ns <= built]
        if weight is not None and predicted:
            found.setdefault(max(predicted)[1], []).append(f"{weight:.3f}")
    return {folder: "/".join(ws) for folder, ws in found.items()}


def version_row(run_dir: Path, experiment: str, version: str, base: dict | None,
                competition: dict, weight: str | None) -> dict | None:
    """One leaderboard row from a run folder (None while it has no scores); `base`: the config
    its changes are shown against (None: the competition's defaults)."""
    scores = _read(run_dir / "scores.json")
    config = _read(run_dir / "config.json")
    if not scores or not config:
        return None
    prov = _read(run_dir / "provenance.json")
    folds = scores.get("per_fold_tta") or scores["per_fold"]
    return dict(experiment=experiment, version=version, cv_tta=scores.get("cv_tta"),
                cv=scores["cv"], fold_std=float(np.std(list(folds.values()))),
                metric=scores["metric"], tta_views=scores.get("tta_views"), blend_weight=weight,
                backbone=config["model"]["backbone"], image_size=config["image_size"],
                epochs=epochs_of(config), train_min=train_minutes(run_dir, prov),
                changes=changes(config, base if base is not None else defaults_of(config, competition)),
                code=(provenance.code_changed(prov) or "") if prov else "no provenance")


def rows(comp_runs: Path, competition: dict) -> list[dict]:
    """A row per experiment's current version (its changes shown against the competition's
    defaults) and per past version (against the current config)."""
    out = []
    for run_dir in sorted(p for p in comp_runs.iterdir() if p.is_dir()):
        current = _read(run_dir / "config.json")
        weights = blend_weights(comp_runs, run_dir)
        row = version_row(run_dir, run_dir.name, "current", None, competition,
                          weights.get(run_dir))
        out += [row] if row else []
        for past in versions(run_dir):
            row = version_row(past, run_dir.name, past.name, current or None, competition,
                              weights.get(past))
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


def build(comp_runs: Path, competition: CompetitionConfig) -> tuple[pd.DataFrame, str]:
    """The leaderboard of `comp_runs`, written as leaderboard.csv and .md; returns both."""
    metric = metrics.name(competition.metric)
    found = rows(comp_runs, competition.model_dump(mode="json")) if comp_runs.is_dir() else []
    if not found:
        raise UserError(f"{comp_runs}: no trained experiment yet; run `make train "
                        f"COMP={comp_runs.name}` first")
    df = table(found, metric)
    md = markdown(df, f"Leaderboard of {comp_runs.name} ({metric}, "
                      f"{'higher' if metrics.higher_is_better(metric) else 'lower'} is better)")
    write_csv(df, comp_runs / "leaderboard.csv", float_format="%.6g")
    write_text(md, comp_runs / "leaderboard.md")
    return df, md


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml")
    cfg = load_competition(args.config, args.overrides)
    _, md = build(Path("runs") / cfg.name, cfg)
    print(md)
    print(f"wrote runs/{cfg.name}/leaderboard.md and leaderboard.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
