"""reports/transfer.md: what pretrained weights and progressive unfreezing buy on the digits demo.

Three variants of configs/digits/lite0.yaml at equal epochs, trained one after the other in
this run on the same folds, each in its own folder (runs/digits/transfer_*; the demo's runs
are untouched): the converted ImageNet weights with the config's progressive unfreezing, the
same stages from random initialisation, and the ImageNet weights with every layer training
from the first epoch.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline.bench import ensure_demo_inputs, train_afresh
from pipeline.core import layout
from pipeline.core.artifacts import write_text
from pipeline.core.config import ExperimentConfig, load_experiment
from pipeline.models.pretrained import convert_lite0

CONFIG = Path("configs/digits/lite0.yaml")
REPORT = Path("reports/transfer.md")


def stages_text(cfg: ExperimentConfig) -> str:
    return ", then ".join(f"{s.epochs} × {s.train}" for s in cfg.finetune.stages)


def variants() -> list[tuple[str, str, list[str]]]:
    """(experiment, description, overrides of the demo config), the demo's own recipe first."""
    base = load_experiment(CONFIG)
    epochs = sum(s.epochs for s in base.finetune.stages)
    return [
        ("transfer_progressive", "ImageNet weights, progressive unfreezing (the demo's lite0)", []),
        ("transfer_random", "random init, same stages", ["model.pretrained=false"]),
        ("transfer_all", "ImageNet weights, everything trains from epoch 1",
         [f"finetune.stages=[{{epochs: {epochs}, train: all}}]"]),
    ]


def evaluate(experiment: str, overrides: list[str]) -> dict:
    cfg = load_experiment(CONFIG, [f"experiment={experiment}", *overrides])
    started = time.perf_counter()
    scores = train_afresh(cfg)
    minutes = (time.perf_counter() - started) / 60
    run = layout.Run.of(cfg.name, cfg.experiment)
    logs = [pd.read_csv(run.log(k)) for k in range(cfg.folds.n_splits)]
    first = sum(log["val_metric"].iloc[0] for log in logs) / len(logs)
    return dict(cfg=cfg, cv=scores["cv"], per_fold=list(scores["per_fold"].values()),
                first_epoch=first, minutes=minutes)


def render(rows: list[tuple[str, dict]], n_train: int) -> str:
    cfg = rows[0][1]["cfg"]
    epochs = sum(s.epochs for s in cfg.finetune.stages)
    lines = [
        "# Transfer learning on the digits demo",
        "",
        f"Written by `make reports` (`pipeline/bench/report_transfer.py`) on "
        f"{datetime.date.today().isoformat()}. {n_train} train images of 10 digits in "
        f"{cfg.folds.n_splits} folds; `{cfg.model.backbone}` at {cfg.image_size} px, "
        f"{epochs} epochs for every variant, batch {cfg.train.batch_size}, top learning rate "
        f"{cfg.train.lr:g}, each group below the one above / {cfg.finetune.lr_decay:g}. All three "
        f"variants trained in this one run, one after the other, in `runs/digits/transfer_*`.",
        "",
        "| variant | stages (epochs × groups trained) | CV accuracy | per fold | "
        "epoch-1 val accuracy | train minutes |",
        "|---|---|---|---|---|---|",
    ]
    for desc, r in rows:
        folds_text = " ".join(f"{v:.3f}" for v in r["per_fold"])
        lines.append(f"| {desc} | {stages_text(r['cfg'])} | **{r['cv']:.4f}** | {folds_text} | "
                     f"{r['first_epoch']:.3f} | {r['minutes']:.1f} |")
    ours = rows[0][1]
    gaps = "; ".join(f"{ours['cv'] - r['cv']:+.4f} over *{desc}*" for desc, r in rows[1:])
    lines += [
        "",
        f"The first row's CV: {gaps}.",
        "",
        "CV: accuracy of the out-of-fold predictions of each fold's best epoch (no TTA). "
        "Epoch-1 val accuracy: the fold models after their first epoch, averaged over folds. "
        "Train minutes: wall time of the five folds on the machine that wrote this report "
        "(shared CPU, so only a rough guide).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ensure_demo_inputs()
    base = load_experiment(CONFIG)
    if not Path(str(base.model.pretrained)).is_file():
        convert_lite0(Path(str(base.model.pretrained)))
    rows = []
    for experiment, desc, overrides in variants():
        print(f"report_transfer: {experiment} ({desc})", file=sys.stderr)
        rows.append((desc, evaluate(experiment, overrides)))
    n_train = len(pd.read_csv(base.data.path("train_csv")))
    write_text(render(rows, n_train), REPORT)
    print(json.dumps({r["cfg"].experiment: r["cv"] for _, r in rows}), f"-> {REPORT}")


if __name__ == "__main__":
    main()
