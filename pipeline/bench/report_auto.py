"""reports/auto.md and reports/auto.png: `make auto` on the digits demo at several budgets.

Each budget runs in a fresh working folder of its own (configs/digits/ holding only
competition.yaml and auto.yaml; data, weights and the code linked), through make, so its wall
time counts everything a user waits for. The report gives per budget the wall time, the
submitted blend's nested CV, its accuracy on the hidden answers (data/digits/solution.csv,
which the pipeline never reads), and the experiments the plan ran, against the hand-written
demo configs' ensemble (its nested CV from runs/digits/ensemble/weights.json when `make demo`
ran here).

    python -m pipeline.bench.report_auto [--budgets 2m 5m 10m] [--work DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.core import layout  # noqa: E402
from pipeline.core.artifacts import write_text  # noqa: E402
from pipeline.datasets.digits import held_out_accuracy  # noqa: E402

COMP = "digits"
REPORT, PLOT = Path("reports/auto.md"), Path("reports/auto.png")
LINKED = ("Makefile", "pipeline", "data", "weights")


def run_budget(budget: str, work: Path) -> dict:
    """`make auto` at `budget` in a fresh folder; its wall time and what it wrote."""
    root = Path.cwd()
    folder = work / budget
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "configs" / COMP).mkdir(parents=True)
    for name in ("competition.yaml", "auto.yaml"):
        shutil.copy(layout.config_file(COMP, name[:-5]), folder / "configs" / COMP / name)
    for name in LINKED:
        os.symlink(root / name, folder / name)
    (folder / "folds").mkdir()
    (folder / "submissions").mkdir()
    started = time.perf_counter()
    subprocess.run(["make", "--no-print-directory", "auto", f"COMP={COMP}", f"BUDGET={budget}",
                    f"PY={sys.executable}"], cwd=folder, check=True)
    wall = time.perf_counter() - started
    state = json.loads((folder / layout.auto_files(COMP)[0]).read_text())
    ens = state.get("ensemble") or {}
    solution = root / "data" / COMP / "solution.csv"
    held_out = held_out_accuracy(folder / ens["submission"], solution) if ens else None
    return dict(budget=budget, seconds=state["budget_seconds"], wall=wall, state=state,
                cv=ens.get("cv"), held_out=held_out)


def reference() -> float | None:
    """The hand-written demo ensemble's nested CV, when `make demo` ran in this folder."""
    path = layout.Run.of(COMP, "ensemble").weights
    return json.loads(path.read_text())["cv"] if path.is_file() else None


def plot(results: list[dict], ref: float | None) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [r["seconds"] / 60 for r in results]
    ax.plot(minutes, [r["cv"] for r in results], "o-", label="auto: nested CV of the submission")
    ax.plot(minutes, [r["held_out"] for r in results], "s--", label="auto: hidden test answers")
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle=":", label="hand-written demo ensemble, nested CV")
    ax.set_xlabel("budget (minutes)")
    ax.set_ylabel("accuracy")
    ax.set_title("make auto on the digits demo (2 CPU cores)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


def report(results: list[dict], ref: float | None) -> str:
    lines = [f"# make auto: score against budget on the digits demo", "",
             f"Written by `python -m pipeline.bench.report_auto` on "
             f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores, no GPU: each "
             f"budget in a fresh working folder holding only configs/digits/competition.yaml and "
             f"auto.yaml (`augment.hflip: false`), through `make auto`. The plan depends on the "
             f"speeds measured, so a rerun may choose differently.", "",
             "![score against budget](auto.png)", "",
             "| budget | wall time (make) | nested CV of the submission | hidden test accuracy | "
             "experiments finished (CV with TTA, seconds planned / real) | left out |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        exps = r["state"]["experiments"]
        ran = "; ".join(f"{n} x{e['choice']['epochs']} {e['status']} "
                        f"({'' if e['cv_tta'] is None else format(e['cv_tta'], '.4f')}, "
                        f"{e['planned_seconds']:.0f} / {e['actual_seconds']:.0f} s)"
                        for n, e in exps.items())
        dropped = r["state"]["plans"][-1]["dropped"] if r["state"]["plans"] else {}
        left = "; ".join(f"{k}: {v}" for k, v in dropped.items() if "not a cpu" not in v)
        cv, held_out = ("none: no experiment finished",) * 2 if r["cv"] is None else \
            (f"{r['cv']:.5f}", f"{r['held_out']:.4f}")
        lines.append(f"| {r['budget']} | {r['wall']:.0f} s | {cv} | {held_out} | {ran} | {left} |")
    lines += ["", "The hand-written demo configs' ensemble (lenet5, resnet10t, lite0: "
              "`make demo`): nested CV "
              + (f"{ref:.5f} (this folder's runs)." if ref is not None else
                 "not run in this folder; reports/ensemble.md records 0.99374."), ""]
    for r in results:
        lines += [f"## {r['budget']}: the auto mode's own report", ""]
        report_file = layout.auto_files(COMP)[1]
        lines += [f"##{line}" if line.startswith("#") else line for line in
                  (Path(r["folder"]) / report_file).read_text().splitlines()[2:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["2m", "5m", "10m"])
    parser.add_argument("--work", type=Path, default=Path("cache/auto-sweep"))
    args = parser.parse_args(argv)
    results = []
    for budget in args.budgets:
        result = run_budget(budget, args.work.resolve())
        result["folder"] = str(args.work.resolve() / budget)
        results.append(result)
        print(f"auto {budget}: wall {result['wall']:.0f} s, nested CV {result['cv']}, "
              f"hidden test {result['held_out']}", file=sys.stderr)
    ref = reference()
    plot(results, ref)
    write_text(report(results, ref), REPORT)
    print(f"wrote {REPORT} and {PLOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
