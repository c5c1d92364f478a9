"""reports/techniques.md: each technique of configs/lowdata/ against the same model without it.

Read from the runs `make lowdata` trained in one run (every config of configs/lowdata/): the
honest CV of each (an experiment's OOF with its TTA views chosen under nested CV, an
ensemble's nested-CV headline) and its accuracy on the hidden test answers
(data/lowdata/solution.csv, which the pipeline never reads), which is where pseudo-labels and
refits show (CV cannot see them: a refit has no OOF). Then the student's and its teacher's
inference speed, measured here one after the other on the test images.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import layout
from pipeline.core.artifacts import write_text
from pipeline.core.config import load_experiment
from pipeline.training.experiment import prepare

COMP = "lowdata"
REPORT = Path("reports/techniques.md")
SOLUTION = Path("data/lowdata/solution.csv")
# (technique, the run with it, the same without it)
PAIRS = [
    ("pseudo-labels (test rows base is sure of, soft, weight 0.5)", "lite0-pseudo", "lite0"),
    ("full-data refit (one more model joins the 5 folds')", "lite0-refit", "lite0"),
    ("checkpoint averaging (last 10 epochs)", "lenet5-swa", "lenet5"),
    ("distillation + pseudo-labels (teacher: base)", "lenet5-student", "lenet5"),
    ("stacking (logistic regression on the OOF)", "stack", "base"),
    ("the submitted blend of the techniques' models", "ensemble", "base"),
]


def is_ensemble(name: str) -> bool:
    return layout.Run.of(COMP, name).weights.is_file()


def scores(name: str) -> dict:
    """The run's honest CV, its in-sample CV where it differs, and its held-out accuracy."""
    run = layout.Run.of(COMP, name)
    if is_ensemble(name):
        record = json.loads(run.weights.read_text())
        cv, in_sample = record["cv"], record["in_sample_cv"]
    else:
        record = json.loads(run.scores.read_text())
        cv, in_sample = record["cv_tta"], record["cv_tta_in_sample"]
    test = pd.read_csv(run.test, dtype={"id": str}).set_index("id")
    truth = pd.read_csv(SOLUTION, dtype=str).set_index("id")["label"]
    predicted = pd.Series(np.asarray(test.columns)[test.to_numpy().argmax(1)], index=test.index)
    return dict(cv=cv, in_sample=in_sample,
                held_out=float((predicted.loc[truth.index] == truth).mean()),
                minutes=train_minutes(name))


def train_minutes(name: str) -> float:
    """Training wall time of an experiment (its folds and refits; 0 for an ensemble)."""
    path = layout.Run.of(COMP, name).provenance
    if not path.is_file():
        return 0.0
    record = json.loads(path.read_text())
    return (sum(record.get("fold_seconds", {}).values()) + record.get("refit_seconds", 0)) / 60


def images_per_second(experiments: list[str]) -> float:
    """Test images per second predicting with every fold model of `experiments` in turn (the
    package's work, less blending), after one warm-up pass."""
    exps = [prepare(load_experiment(layout.config_file(COMP, name))) for name in experiments]
    views = [json.loads(e.run.scores.read_text())["tta_views"] for e in exps]
    for e, v in zip(exps, views):
        e.predict_test([v])
    started = time.perf_counter()
    for e, v in zip(exps, views):
        e.predict_test([v])
    return len(exps[0].comp.test) / (time.perf_counter() - started)


def render(results: dict[str, dict], speed: dict[str, float], n_train: int, n_test: int) -> str:
    lines = [
        "# What wins competitions, on a low-data competition",
        "",
        f"Written by `make lowdata` (`pipeline/bench/report_techniques.py`) on "
        f"{datetime.date.today().isoformat()}: the digits with {n_train} train images (about "
        f"{n_train // 10} per digit) in 5 folds and {n_test} test images whose answers the "
        f"pipeline never reads. Every run below was trained in that one `make lowdata` run, "
        f"with the same folds and seeds; each fold model keeps its last epoch "
        f"(`train.keep: last`), so no fold model is chosen on its own fold's labels.",
        "",
        "| technique | with | CV | held-out | without | CV | held-out | gain CV | gain held-out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for technique, with_, without in PAIRS:
        a, b = results[with_], results[without]
        lines.append(
            f"| {technique} | `{with_}` | **{a['cv']:.4f}** | **{a['held_out']:.4f}** | "
            f"`{without}` | {b['cv']:.4f} | {b['held_out']:.4f} | {a['cv'] - b['cv']:+.4f} | "
            f"{a['held_out'] - b['held_out']:+.4f} |")
    student, teacher = speed["lenet5-student"], speed["base"]
    s, t = results["lenet5-student"], results["base"]
    lines += [
        "",
        "CV: accuracy of the out-of-fold predictions, honest: an experiment's TTA views and an "
        "ensemble's weights, mode or meta-model chosen without each fold (nested CV). A refit "
        "has no OOF, so `lite0-refit`'s CV is its five fold models' (the same as `lite0`'s); "
        "its gain shows on the held-out test only. Held-out: accuracy of the run's test "
        "predictions against the hidden answers.",
        "",
        "In-sample (optimistic) figures beside the honest ones: "
        + "; ".join(f"`{name}` {r['in_sample']:.4f} vs {r['cv']:.4f}"
                    for name, r in results.items() if abs(r["in_sample"] - r["cv"]) > 1e-12)
        + ".",
        "",
        "## The student against its teacher",
        "",
        "| model | CV | held-out | test images/s (fold models, CPU) |",
        "|---|---|---|---|",
        f"| `lenet5-student` (5 LeNet-5 folds) | {s['cv']:.4f} | {s['held_out']:.4f} | "
        f"{student:.0f} |",
        f"| `base` (teacher: 5 LeNet-5 + 5 Lite0 folds) | {t['cv']:.4f} | {t['held_out']:.4f} | "
        f"{teacher:.0f} |",
        "",
        f"The student predicts {student / teacher:.1f}x faster than its teacher. Speeds "
        f"measured one after the other in this run on the machine that wrote the report "
        f"(shared CPU: a rough guide); each after a warm-up pass.",
        "",
        "Train minutes per experiment (folds and refits, as trained in the run): "
        + ", ".join(f"`{name}` {r['minutes']:.1f}" for name, r in results.items()
                    if not is_ensemble(name)) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    names = dict.fromkeys(n for _, with_, without in PAIRS for n in (with_, without))
    results = {name: scores(name) for name in names}
    speed = {"lenet5-student": images_per_second(["lenet5-student"]),
             "base": images_per_second(["lenet5", "lite0"])}
    comp = prepare(load_experiment(layout.config_file(COMP, "lenet5"))).comp
    write_text(render(results, speed, len(comp.train), len(comp.test)), REPORT)
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
