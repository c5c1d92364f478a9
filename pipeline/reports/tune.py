"""The tuning stage's report: report.md (best values, top trials, tuning vs full-CV scores) and
history.png, importances.png, intermediate.png beside the study."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from pipeline.core import metrics  # noqa: E402
from pipeline.core.artifacts import atomic_path, write_text  # noqa: E402
from pipeline.core.config import ExperimentConfig  # noqa: E402
from pipeline.tuning.steps import fold_epoch  # noqa: E402

TOP = 10


def _save(ax, path: Path) -> None:
    fig = ax.figure
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_history(study: optuna.Study, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _save(optuna.visualization.matplotlib.plot_optimization_history(study), path)


def plot_importances(study: optuna.Study, path: Path) -> bool:
    """optuna's parameter importances (its default evaluator); False when the trials cannot rank them yet
    (fewer than two completed, or every parameter constant)."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(study)
        except (ValueError, RuntimeError):
            plt.close("all")
            return False
    _save(ax, path)
    return True


def plot_intermediate(study: optuna.Study, metric: str, folds: list[int], per_fold: int,
                      path: Path) -> None:
    """Each trial's validation score by epoch, one panel per tuning fold (steps:
    pipeline.tuning.steps, `per_fold` a fold): completed trials in blue, pruned ones in red."""
    fig, axes = plt.subplots(1, len(folds), figsize=(4 + 3 * len(folds), 4), sharey=True,
                             squeeze=False)
    for state, colour in ((TrialState.COMPLETE, "tab:blue"), (TrialState.PRUNED, "tab:red")):
        trials = study.get_trials(deepcopy=False, states=(state,))
        for i, t in enumerate(trials):
            for position, ax in enumerate(axes[0]):
                steps = sorted(s for s in t.intermediate_values
                               if fold_epoch(s, per_fold)[0] == position)
                ax.plot([fold_epoch(s, per_fold)[1] for s in steps],
                        [t.intermediate_values[s] for s in steps],
                        color=colour, alpha=0.5, lw=1, marker=".", ms=4,  # one epoch: a dot
                        label=f"{state.name.lower()} ({len(trials)})" if i == 0 else None)
    for fold, ax in zip(folds, axes[0]):
        ax.set(xlabel="epoch", title=f"fold {fold}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(f"validation {metric}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("intermediate values: pruned vs completed")
    _save(axes[0][0], path)


def wall_seconds(study: optuna.Study) -> float:
    """From the first trial's start to the last finished trial's end."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    if not trials:
        return 0.0
    return (max(t.datetime_complete for t in trials)
            - min(t.datetime_start for t in trials)).total_seconds()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(study: optuna.Study, cfg: ExperimentConfig, summary: dict, cv: dict,
           importances: bool) -> str:
    metric = metrics.name(cfg.metric)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    epochs = sum(t.user_attrs.get("epochs", 0) for t in finished)
    counts = summary["trials"]
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=metrics.higher_is_better(metric))
    keys = list(summary["best_params"])
    lines = [
        f"# Tuning {cfg.experiment} ({cfg.name})", "",
        f"Study `{summary['study']}` in `{summary['storage']}`; objective: {metric} on the "
        f"held-out rows of folds {summary['folds']}; pruner {cfg.tune.pruner}, sampler "
        f"{cfg.tune.sampler}.", "",
        f"Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} "
        f"failed, {counts['running']} running; {epochs} epochs trained; wall time "
        f"{wall_seconds(study):.0f} s.", "",
        f"## Best trial: {summary['best_trial']}, {metric} {summary['best_value']:.5f}", "",
        "| key | value |", "|---|---|",
        *[f"| `{k}` | {_fmt(v)} |" for k, v in summary["best_params"].items()], "",
        f"Outcome: {summary['verdict']}.", "",
        "## Scores", "",
        "| | " + metric + " | |", "|---|---|---|",
        f"| best tuning score | {summary['best_value']:.5f} | folds {summary['folds']}: "
        f"chosen on the rows it is measured on, so optimistic |",
        "| base config, tuning score | "
        + (f"{summary['base_value']:.5f} | trial {summary['base_trial']}: the experiment as "
           f"written, on the same folds |" if summary["base_value"] is not None
           else "none yet | the base trial has not completed |"),
        *[f"| {label} config, full CV | "
          + (f"{cv[label]:.5f} | `make all` on every fold |" if cv[label] is not None
             else "not trained yet | run `make all`, then `make tune` again to fill this in |")
          for label in ("tuned", "untuned")], "",
        f"## Top {min(TOP, len(complete))} completed trials", "",
        "| trial | " + metric + " | epochs | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---" * (3 + len(keys)) + "|",
        *[f"| {t.number}{' (base)' if t.user_attrs.get('base') else ''} | {t.value:.5f} | "
          f"{t.user_attrs.get('epochs', '')} | "
          + " | ".join(_fmt(t.params.get(k, "")) for k in keys) + " |" for t in complete[:TOP]],
        "", "![history](history.png)", "",
        "![importances](importances.png)" if importances
        else "(Parameter importances need two or more completed trials that differ.)", "",
        "![intermediate values](intermediate.png)", ""]
    return "\n".join(lines)


def write_report(study: optuna.Study, cfg: ExperimentConfig, summary: dict, out: Path,
                 cv: dict, per_fold: int) -> None:
    plot_history(study, out / "history.png")
    importances = plot_importances(study, out / "importances.png")
    plot_intermediate(study, metrics.name(cfg.metric), summary["folds"], per_fold,
                      out / "intermediate.png")
    write_text(render(study, cfg, summary, cv, importances), out / "report.md")
