"""`make reports` section: the ensemble stage on the digits demo -> reports/ensemble.md.

Blends every experiment of configs/digits/ (what `make predict COMP=digits` trains and
predicts; `make reports` runs that first) with the settings of configs/digits/ensemble.yaml,
once per blend mode (stack included), each into its own run folder
runs/digits/report-ensemble-<mode>/ (with its report.md and plots), leaving the stage's own
runs/digits/ensemble/ alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.bench import experiment_configs
from pipeline.blending import blend
from pipeline.blending.run import run_ensemble
from pipeline.core.artifacts import write_text
from pipeline.core.config import load_ensemble
from pipeline.core.errors import cli
from pipeline.reports import ensemble as ensemble_report

CONFIG = Path("configs/digits/ensemble.yaml")
REPORT = Path("reports/ensemble.md")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render(results: dict, configured: str) -> str:
    """The configured mode's score table and weights, then one row per blend mode."""
    main = results[configured]
    names = main["experiments"]
    modes = ["| mode | submitted, nested CV | submitted, in sample | equal weights | used | "
             "weights used |", "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in results.items():
        used = ", ".join(f"{n} {r['weights'][n]:.2f}" for n in names)
        nested = r["nested_cv"]["cv"] if r["nested_cv"] else None
        modes.append(f"| {mode} | {fmt(nested)} | {fmt(r['in_sample_cv'])} | "
                     f"{fmt(r['equal_weights_cv'])} | {r['weights_choice']} ({r['mode']}) | "
                     f"{used} |")
    cfg = load_ensemble(CONFIG)
    return "\n".join([
        "# Ensembling on the digits demo", "",
        "Written by `make reports` (`pipeline/bench/report_ensemble.py`) after "
        "`make predict COMP=digits`: the ensemble stage on the OOF (with TTA) of "
        f"{', '.join(names)}, {cfg.metric}, {cfg.trials} seeded TPE trials per study, "
        f"{cfg.folds.n_splits}-fold nested CV, seed {cfg.seed}.", "",
        f"## The configured blend (mode `{configured}`)", "",
        ensemble_report.score_table(main), "",
        f"Submitted: {ensemble_report.used(main)}; {main['decision']}.", "",
        *ensemble_report.choices_table(main), "",
        "## Blend modes", "",
        "Nested CV is the honest column: what is submitted, chosen without the fold it is "
        "scored on.", "",
        *modes, ""])


@cli
def main() -> None:
    experiments = [p.stem for p in experiment_configs()]
    configured = load_ensemble(CONFIG).mode
    results = {}
    for mode in dict.fromkeys([configured, *blend.MODES, "tune", "stack"]):
        overrides = [f"experiments=[{', '.join(experiments)}]", f"mode={mode}",
                     f"experiment=report-ensemble-{mode}"]
        results[mode] = run_ensemble(load_ensemble(CONFIG, overrides))
    write_text(render(results, configured), REPORT)
    print(f"report_ensemble: wrote {REPORT}", file=sys.stderr)


if __name__ == "__main__":
    main()
