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
        style = "-o" if name in ("nested CV", "equal weights") else "--."
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
    """The markdown table: nested CV of what is submitted (the headline), in sample, equal
    weights, best single."""
    metric, nested = result["metric"], result["nested_cv"]
    rows = [("submitted, nested CV", None if nested is None else nested["cv"],
             "weights, mode and thresholds chosen on the other folds, scored on the held-out "
             "fold: the honest figure" if nested is not None else "not run (nested_cv: false)"),
            ("submitted, in sample", result["in_sample_cv"],
             "chosen and scored on the same OOF: optimistic"),
            ("equal weights", result["equal_weights_cv"], "no tuning, default decisions"),
            (f"best single ({result['best_single']})", result["single_cv"][result["best_single"]],
             "OOF with TTA")]
    lines = [f"| blend | {metric} | |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'-' if v is None else f'{v:.5f}'} | {note} |" for name, v, note in rows]
    return "\n".join(lines)


def used(result: dict) -> str:
    """What is submitted, in words."""
    weights = ", ".join(f"{n}={w:.3f}" for n, w in result["weights"].items())
    decisions = {None: "", "default": ", default decisions",
                 "tuned": ", tuned decision thresholds"}[result["thresholds_choice"]]
    meta = result.get("stack")
    if meta is not None:
        return (f"a stacked {meta['model']} meta-model, strength {meta['strength']:g} "
                f"(coefficient shares {weights}){decisions}")
    return f"{result['weights_choice']} weights {weights}, mode {result['mode']}{decisions}"


def mode_text(choice: dict) -> str:
    """A choice's mode; a stack's with its meta-model and strength."""
    meta = choice.get("stack")
    return choice["mode"] if meta is None else \
        f"{choice['mode']} ({meta['model']}, strength {meta['strength']:g})"


def headline(result: dict) -> str:
    """The score to quote first: the nested-CV score of exactly what is submitted, the
    in-sample score beside it, labelled optimistic."""
    metric = result["metric"]
    if result["nested_cv"] is None:
        return (f"in-sample OOF {metric} {result['cv']:.5f} with {used(result)} "
                f"(nested_cv off: optimistic, unchecked)")
    return (f"{result['cv_basis']} {metric} {result['cv']:.5f} with {used(result)} "
            f"(in-sample {result['in_sample_cv']:.5f}, optimistic)")


def per_column_lines(result: dict) -> list[str]:
    """Markdown: the blend's per-label or per-grade scores, where the task has them."""
    if not result.get("per_column"):
        return []
    return ["## Per label / grade (OOF of the blend)", "",
            "| column | score |", "| --- | --- |",
            *[f"| {c} | {v:.4f} |" for c, v in result["per_column"].items()], "",
            "Labels: ROC-AUC; grades: mean absolute error of the predicted grade value.", ""]


def choices_table(result: dict) -> list[str]:
    """Markdown: what was chosen on all folds and, under nested CV, without each fold (a
    stack's member weights are its coefficient shares)."""
    names = result["experiments"]
    folds = (result["nested_cv"] or {}).get("folds", {})
    chosen = {"all folds (submitted)": result, **{f"without fold {f}": c for f, c in folds.items()}}
    head = ["chosen on", *names, "mode", "weights", "thresholds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, c in chosen.items():
        th = c["thresholds"]
        th_text = "-" if c["thresholds_choice"] is None else c["thresholds_choice"] if th is None \
            else "tuned " + ", ".join(f"{v:.2f}" for v in np.atleast_1d(th.get("cuts", th.get("values"))))
        lines.append("| " + " | ".join([label, *[f"{c['weights'][n]:.3f}" for n in names],
                                         mode_text(c), c["weights_choice"], th_text]) + " |")
    return lines


def render_report(result: dict, cfg: EnsembleConfig) -> str:
    storage = cfg.storage or f"sqlite:///{layout.Run.of(cfg.name, cfg.experiment).study}"
    sampler = "TPE, a study shared through `storage`" if cfg.storage else f"TPE, seed {cfg.seed}"
    how = f"{cfg.trials} optuna trials per study ({sampler}), mode `{cfg.mode}`."
    if result.get("stack_cv") is not None:
        tried = ", ".join(f"{s}: {v:.5f}" for s, v in result["stack_cv"].items())
        how = (f"mode `stack`: a meta-model on the members' OOF, its regularisation strength "
               f"chosen by CV within the rows of each choice (on all rows: {tried}).")
    return "\n".join([
        f"# Ensemble `{cfg.experiment}` of {cfg.name}: {', '.join(result['experiments'])}", "",
        f"Metric: {result['metric']} ({metrics.direction(result['metric'])}); {how}", "",
        score_table(result), "",
        f"**Submitted: {used(result)}. {headline(result)}.**", "",
        "Every choice (weights and mode or the stack, equal weights instead when they do not "
        "beat them under CV, decision thresholds instead of the defaults likewise) is made by one "
        "procedure; the nested figure runs it without each fold and scores that fold.", "",
        "## Choices", "", *choices_table(result), "",
        *per_column_lines(result),
        *([f"Study: `{storage}`, name `{cfg.name}-{cfg.experiment}`.", "",
           "![optimisation history](history.png)", ""] if result["trials"] else []),
        "![per-fold scores](folds.png)", ""])


def write(study: optuna.Study, result: dict, cfg: EnsembleConfig, run: layout.Run) -> None:
    """report.md with history.png (the optimisation history, when the weights were searched)
    and folds.png (per-fold scores)."""
    metric = metrics.name(cfg.metric)
    if study.trials:
        plot_history(study, metric, run.file("history.png"))
    plot_folds(result["per_fold"], metric, run.file("folds.png"))
    write_text(render_report(result, cfg), run.report)
