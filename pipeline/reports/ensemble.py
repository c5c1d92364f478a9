"""The ensemble stage's report: report.md with its score table, history.png and folds.png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
from matplotlib.figure import Figure

from pipeline.core import layout, metrics
from pipeline.core.artifacts import atomic_path, write_text
from pipeline.core.config import EnsembleConfig


def plot_history(study: optuna.Study, metric: str, path: Path) -> None:
    trials = [t for t in study.trials if t.value is not None]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for mode in dict.fromkeys(t.user_attrs["mode"] for t in trials):
        pts = [(t.number, t.value) for t in trials if t.user_attrs["mode"] == mode]
        ax.scatter(*zip(*pts), s=10, alpha=0.6, label=f"trial ({mode})")
    best = np.maximum.accumulate if metrics.higher_is_better(metric) else np.minimum.accumulate
    ax.step([t.number for t in trials], best([t.value for t in trials]), where="post",
            color="black", label="best so far")
    ax.set(xlabel="trial", ylabel=f"OOF {metric}", title="optimisation history")
    ax.legend(fontsize=8)
    _save_png(fig, path)


def plot_folds(per_fold: dict, metric: str, path: Path) -> None:
    """One line per series across the folds: {series: {fold: score}}."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, scores in per_fold.items():
        style = "-o" if name in ("nested-CV tuned", "equal weights") else "--."
        ax.plot(list(scores), list(scores.values()), style, label=name)
    ax.set(xlabel="fold", ylabel=f"{metric}", title="per-fold scores")
    ax.set_xticks(list(next(iter(per_fold.values()))))
    ax.legend(fontsize=8)
    _save_png(fig, path)


def _save_png(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def score_table(result: dict) -> str:
    """The markdown table: in-sample tuned, nested-CV tuned, equal weights, best single."""
    metric = result["metric"]
    nested = result["nested_cv"]
    rows = [("in-sample tuned", result["tuned_in_sample_cv"],
             "tuned and scored on the same OOF: optimistic"),
            ("nested-CV tuned", nested,
             "tuned on k-1 folds, scored on the held-out fold" if nested is not None
             else "not run (nested_cv: false)"),
            ("equal weights", result["equal_weights_cv"], "no tuning"),
            (f"best single ({result['best_single']})", result["single_cv"][result["best_single"]],
             "OOF with TTA")]
    lines = [f"| blend | {metric} | |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'-' if v is None else f'{v:.5f}'} | {note} |" for name, v, note in rows]
    return "\n".join(lines)


def headline(result: dict) -> str:
    """The score to quote first: nested CV for tuned weights (the in-sample OOF score of weights
    tuned on that same OOF is optimistic), the plain OOF score for untuned equal weights."""
    metric, weights = result["metric"], result["weights"]
    used = (f"{result['choice']} weights {', '.join(f'{n}={w:.3f}' for n, w in weights.items())}, "
            f"mode {result['mode']}")
    if result["choice"] == "tuned" and result["nested_cv"] is not None:
        return (f"nested-CV {metric} {result['nested_cv']:.5f} with {used} "
                f"(in-sample OOF {result['cv']:.5f}, optimistic)")
    if result["choice"] == "tuned":
        return f"in-sample OOF {metric} {result['cv']:.5f} with {used} (nested_cv off: unchecked)"
    return f"OOF {metric} {result['cv']:.5f} with {used}"


def threshold_lines(result: dict) -> list[str]:
    """Markdown: the decision thresholds (default, in-sample tuned, nested-CV tuned) and the
    blend's per-label or per-grade scores, where they exist."""
    lines = []
    th = result.get("threshold_scores")
    if th:
        lines += ["## Decision thresholds", "",
                  f"| thresholds ({th['kind']}) | {result['metric']} |", "| --- | --- |",
                  f"| default (0.5 / rounding) | {th['default']:.5f} |",
                  f"| tuned in sample (optimistic) | {th['in_sample']:.5f} |",
                  f"| tuned under nested CV | {th['nested']:.5f} |", "",
                  f"Used: {th['used']} thresholds (tuned: {th['tuned']}).", ""]
    if result.get("per_column"):
        lines += ["## Per label / grade (OOF of the blend)", "",
                  "| column | score |", "| --- | --- |",
                  *[f"| {c} | {v:.4f} |" for c, v in result["per_column"].items()], "",
                  "Labels: ROC-AUC; grades: mean absolute error of the predicted grade value.", ""]
    return lines


def render_report(result: dict, cfg: EnsembleConfig) -> str:
    names = result["experiments"]
    nested = result["nested_fold_weights"]
    head = ["experiment", "single CV", "tuned (all folds)", "used"] + [f"fold {f}" for f in nested]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in names:
        cells = [n, f"{result['single_cv'][n]:.5f}", f"{result['tuned_weights'][n]:.3f}",
                 f"{result['weights'][n]:.3f}"] + [f"{w[n]:.3f}" for w in nested.values()]
        lines.append("| " + " | ".join(cells) + " |")
    modes = [result["tuned_mode"], result["mode"]] + list(result["nested_fold_modes"].values())
    lines.append("| mode | | " + " | ".join(modes) + " |")
    storage = cfg.storage or f"sqlite:///{layout.Run.of(cfg.name, cfg.experiment).study}"
    sampler = "TPE, a study shared through `storage`" if cfg.storage else f"TPE, seed {cfg.seed}"
    return "\n".join([
        f"# Ensemble `{cfg.experiment}` of {cfg.name}: {', '.join(names)}", "",
        f"Metric: {result['metric']} ({metrics.direction(result['metric'])}); "
        f"{cfg.trials} optuna trials ({sampler}), mode `{cfg.mode}`.", "",
        score_table(result), "",
        *threshold_lines(result),
        f"**Used: {result['choice']} weights, mode `{result['mode']}`, OOF {result['metric']} "
        f"{result['cv']:.5f}.** {result['decision']}", "",
        "## Weights", "",
        "Tuned on all folds, used, and (nested CV) tuned without each fold:", "",
        *lines, "",
        f"Study: `{storage}`, name `{cfg.name}-{cfg.experiment}`.", "",
        "![optimisation history](history.png)", "",
        "![per-fold scores](folds.png)", ""])


def write(study: optuna.Study, result: dict, cfg: EnsembleConfig, run: layout.Run) -> None:
    """report.md with history.png (the optimisation history) and folds.png (per-fold scores)."""
    metric = metrics.name(cfg.metric)
    plot_history(study, metric, run.file("history.png"))
    plot_folds(result["per_fold"], metric, run.file("folds.png"))
    write_text(render_report(result, cfg), run.report)
