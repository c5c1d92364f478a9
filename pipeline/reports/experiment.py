"""One experiment's report: runs/<comp>/<exp>/report.md with its PNGs, written by predict.

Learning curves per fold (from each fold's log.csv), then what fits the task: for
classification the per-class metrics, the OOF confusion matrix, a reliability (calibration)
plot and a gallery of the OOF images the model got most confidently wrong. `SECTIONS` maps how
the task's predictions read (`Task.predicts`) to its part of the report. Last, the label-noise
candidates: the train rows whose OOF prediction confidently contradicts their label
(`Task.label_noise` at NOISE_LEVEL), listed in label_noise.csv (id, label, predicted,
confidence; a file `data.exclude` takes) with a gallery of their images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from pipeline.core import layout
from pipeline.core.artifacts import atomic_path, write_csv, write_text

if TYPE_CHECKING:
    from pipeline.training.experiment import Experiment

DPI = 80  # small files: a few tens of kB each
NOISE_LEVEL = 0.9  # a label contradicted with this confidence is a label-noise candidate


@dataclass
class OOF:
    """Out-of-fold predictions in train-table order, with what the plots need."""

    classes: list[str]
    y: np.ndarray  # (N,) class index, (N, L) 0/1 labels, or (N,) values
    proba: np.ndarray  # (N, K) probabilities, or (N, 1) values
    folds: np.ndarray  # (N,)
    images: np.ndarray  # (N, side, side, C) uint8 cache rows, for the gallery


def save_png(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def read_logs(run: layout.Run) -> dict[int, pd.DataFrame]:
    """{fold: its log.csv} for the folds that have one."""
    return {k: pd.read_csv(path) for k, path in run.fold_logs().items()}


def stage_starts(log: pd.DataFrame) -> list[int]:
    """The epochs at which a new fine-tuning stage begins (the first excluded)."""
    changed = log["stage"].ne(log["stage"].shift()) & log.index.to_series().gt(0)
    return log.loc[changed, "epoch"].tolist()


def plot_learning_curves(logs: dict[int, pd.DataFrame], metric: str, path: Path) -> None:
    """Train and validation loss, and the validation metric, per epoch and fold; dotted
    lines where a fine-tuning stage begins."""
    fig = Figure(figsize=(9, 3.6))
    loss_ax, metric_ax = fig.subplots(1, 2)
    for i, (fold, log) in enumerate(sorted(logs.items())):
        colour = f"C{i % 10}"
        loss_ax.plot(log["epoch"] + 1, log["train_loss"], "-", color=colour, label=f"fold {fold} train")
        loss_ax.plot(log["epoch"] + 1, log["val_loss"], "--", color=colour, label=f"fold {fold} val")
        metric_ax.plot(log["epoch"] + 1, log["val_metric"], "-o", ms=3, color=colour,
                       label=f"fold {fold}")
    starts = sorted({e for log in logs.values() for e in stage_starts(log)})
    for ax in (loss_ax, metric_ax):
        for e in starts:
            ax.axvline(e + 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch" + (" (dotted: stage starts)" if starts else ""))
    loss_ax.set(ylabel="loss", title="loss (solid: train, dashed: validation)")
    metric_ax.set(ylabel=metric, title=f"validation {metric}")
    loss_ax.legend(fontsize=7, ncol=2)
    metric_ax.legend(fontsize=7)
    save_png(fig, path)


def per_class_table(oof: OOF) -> str:
    """Markdown: precision, recall, F1 and support of each class (argmax predictions)."""
    k = len(oof.classes)
    p, r, f, n = precision_recall_fscore_support(oof.y, oof.proba.argmax(1), labels=np.arange(k),
                                                 zero_division=0)
    lines = ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {p[i]:.3f} | {r[i]:.3f} | {f[i]:.3f} | {n[i]} |"
              for i, c in enumerate(oof.classes)]
    return "\n".join(lines)


def plot_confusion(oof: OOF, path: Path) -> None:
    k = len(oof.classes)
    cm = confusion_matrix(oof.y, oof.proba.argmax(1), labels=np.arange(k))
    side = min(9, 2.5 + 0.45 * k)
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if k <= 25:
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7,
                        color="white" if cm[t, p] > cm.max() / 2 else "black")
    ticks = np.arange(k) if k <= 40 else []
    ax.set_xticks(ticks, [oof.classes[i] for i in ticks], rotation=90 if k > 10 else 0, fontsize=7)
    ax.set_yticks(ticks, [oof.classes[i] for i in ticks], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="OOF confusion matrix (counts)")
    save_png(fig, path)


def calibration(oof: OOF, bins: int = 10) -> pd.DataFrame:
    """Per confidence bin (top-class probability): rows, mean confidence, accuracy."""
    conf = oof.proba.max(1)
    correct = oof.proba.argmax(1) == oof.y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    df = pd.DataFrame({"bin": which, "conf": conf, "correct": correct})
    out = df.groupby("bin").agg(n=("conf", "size"), confidence=("conf", "mean"),
                                accuracy=("correct", "mean"))
    return out.reindex(range(bins)).assign(lo=edges[:-1], hi=edges[1:])


def expected_calibration_error(table: pd.DataFrame) -> float:
    t = table.dropna()
    return float((t["n"] * (t["confidence"] - t["accuracy"]).abs()).sum() / t["n"].sum())


def plot_reliability(table: pd.DataFrame, ece: float, path: Path) -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    t = table.dropna()
    width = (table["hi"] - table["lo"]).iloc[0]
    ax.bar(t["lo"], t["accuracy"], width=width, align="edge", edgecolor="black", alpha=0.7,
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(t["confidence"], t["accuracy"], "o", color="C3", ms=4, label="mean confidence")
    for lo, acc, n in zip(t["lo"], t["accuracy"], t["n"]):
        ax.text(lo + width / 2, acc + 0.01, f"{n:.0f}", ha="center", va="bottom", fontsize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="top-class probability (numbers: rows per bin)",
           ylabel="accuracy", title=f"reliability (ECE {ece:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    save_png(fig, path)


def confident_mistakes(oof: OOF, n: int) -> np.ndarray:
    """Rows of the `n` wrong OOF predictions with the highest predicted probability."""
    pred = oof.proba.argmax(1)
    wrong = np.flatnonzero(pred != oof.y)
    return wrong[np.argsort(-oof.proba[wrong, pred[wrong]], kind="stable")][:n]


def plot_gallery(images: np.ndarray, titles: list[str], path: Path) -> None:
    """The images (N, side, side, C), each above its title, six to a line."""
    cols = min(6, len(images))
    lines = -(-len(images) // cols)
    fig = Figure(figsize=(1.6 * cols, 2.1 * lines))
    axes = np.atleast_1d(fig.subplots(lines, cols)).ravel()
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray")
        ax.set_title(title, fontsize=7)
    for ax in axes:
        ax.axis("off")
    save_png(fig, path)


def classification_sections(oof: OOF, ids: list[str], run_dir: Path, gallery: int) -> list[str]:
    """Per-class metrics, confusion matrix, reliability plot, gallery of confident mistakes."""
    plot_confusion(oof, run_dir / "confusion.png")
    table = calibration(oof)
    ece = expected_calibration_error(table)
    plot_reliability(table, ece, run_dir / "reliability.png")
    lines = ["## Per class (OOF)", "", per_class_table(oof), "",
             "![confusion matrix](confusion.png)", "",
             "## Calibration", "",
             f"Expected calibration error {ece:.4f} over {len(table.dropna())} confidence bins.", "",
             "![reliability](reliability.png)", "", "## Most confident mistakes", ""]
    rows = confident_mistakes(oof, gallery)
    if len(rows):
        pred = oof.proba.argmax(1)
        plot_gallery(oof.images[rows], [
            f"{ids[r]}\ntrue {oof.classes[oof.y[r]]}\n"
            f"pred {oof.classes[pred[r]]} ({oof.proba[r, pred[r]]:.2f})" for r in rows],
            run_dir / "mistakes.png")
        lines += [f"The {len(rows)} wrong OOF predictions made with the highest probability.", "",
                  "![most confident mistakes](mistakes.png)", ""]
    else:
        lines += ["No OOF prediction is wrong.", ""]
    return lines


def multilabel_sections(oof: OOF, ids: list[str], run_dir: Path, gallery: int) -> list[str]:
    """Per label: precision, recall and F1 at 0.5, ROC-AUC, positives."""
    hard = (oof.proba >= 0.5).astype(np.int64)
    y = oof.y.astype(np.int64)
    p, r, f, n = precision_recall_fscore_support(y, hard, zero_division=0)
    lines = ["## Per label (OOF, threshold 0.5)", "",
             "| label | precision | recall | F1 | ROC-AUC | positives |",
             "| --- | --- | --- | --- | --- | --- |"]
    for j, c in enumerate(oof.classes):
        both = 0 < y[:, j].sum() < len(y)
        auc = f"{roc_auc_score(y[:, j], oof.proba[:, j]):.3f}" if both else "-"
        lines.append(f"| {c} | {p[j]:.3f} | {r[j]:.3f} | {f[j]:.3f} | {auc} | {n[j]} |")
    return lines + [""]


def value_sections(oof: OOF, ids: list[str], run_dir: Path, gallery: int) -> list[str]:
    """Predicted against true values, and the residuals' distribution."""
    pred, y = oof.proba[:, 0], oof.y.astype(np.float64)
    fig = Figure(figsize=(9, 4))
    scatter, hist = fig.subplots(1, 2)
    scatter.scatter(y, pred, s=6, alpha=0.5)
    lo, hi = min(y.min(), pred.min()), max(y.max(), pred.max())
    scatter.plot([lo, hi], [lo, hi], "k--", lw=1)
    scatter.set(xlabel="true", ylabel="predicted", title="OOF predicted vs true")
    hist.hist(pred - y, bins=30)
    hist.set(xlabel="predicted - true", ylabel="rows", title="OOF residuals")
    save_png(fig, run_dir / "residuals.png")
    rmse, mae = float(np.sqrt(np.mean((pred - y) ** 2))), float(np.mean(np.abs(pred - y)))
    return ["## Predicted vs true (OOF)", "", f"RMSE {rmse:.4f}, MAE {mae:.4f}.", "",
            "![predicted vs true and residuals](residuals.png)", ""]


# The report's part for each kind of prediction (Task.predicts).
SECTIONS: dict[str, Callable[[OOF, list[str], Path, int], list[str]]] = {
    "classes": classification_sections,
    "labels": multilabel_sections,
    "values": value_sections,
}


def label_noise(task, oof: OOF, ids: list[str], labels: list[str]) -> pd.DataFrame | None:
    """label_noise.csv's rows: id, label (as the train table spells it), predicted, confidence,
    most confident first, with `row` (into the train table) for the gallery; None where the
    task's predictions carry no confidence (values)."""
    found = task.label_noise(oof.y, oof.proba, NOISE_LEVEL)
    if found is None:
        return None
    rows = found["row"].to_numpy()
    return pd.DataFrame(dict(id=np.asarray(ids, dtype=object)[rows],
                             label=np.asarray(labels, dtype=object)[rows],
                             predicted=found["predicted"].to_numpy(dtype=object),
                             confidence=found["confidence"].to_numpy(), row=rows))


def noise_section(noise: pd.DataFrame | None, predicts: str, oof: OOF, run_dir: Path,
                  gallery: int) -> list[str]:
    """The label-noise candidates: how many, where listed, the gallery of the most confident."""
    lines = ["## Label noise candidates (OOF)", ""]
    if noise is None:
        return lines + [f"Not listed: the predictions are {predicts}, which carry no confidence.",
                        ""]
    lines += [f"{len(noise)} train rows whose OOF prediction contradicts their label with "
              f"confidence >= {NOISE_LEVEL} (label_noise.csv: id, label, predicted, confidence; "
              f"once checked, `data.exclude` naming it drops them before folds).", ""]
    if len(noise):
        shown = noise.head(gallery)
        plot_gallery(oof.images[shown["row"].to_numpy()],
                     [f"{i}\nlabel {lab}\npred {p} ({c:.2f})" for i, lab, p, c in
                      zip(shown["id"], shown["label"], shown["predicted"], shown["confidence"])],
                     run_dir / "label_noise.png")
        lines += ["![label noise candidates](label_noise.png)", ""]
    return lines


def render(experiment: str, predicts: str, scores: dict, logs: dict[int, pd.DataFrame], oof: OOF,
           ids: list[str], run_dir: Path, gallery: int = 18,
           noise: pd.DataFrame | None = None) -> str:
    """Write the PNGs into `run_dir`; return report.md's text (`noise`: label_noise's rows)."""
    metric = scores["metric"]
    tta = (f", {scores['cv_tta']:.5f} with TTA ({scores['tta_views']})"
           if "cv_tta" in scores else "")
    folds = scores.get("per_fold_tta") or scores["per_fold"]
    lines = [f"# Experiment `{experiment}`", "",
             f"OOF {metric}: {scores['cv']:.5f} without TTA{tta}; per fold "
             f"{', '.join(f'{f}: {v:.4f}' for f, v in folds.items())}.", "",
             "## Learning curves", ""]
    if logs:
        plot_learning_curves(logs, metric, run_dir / "learning_curves.png")
        lines += ["![learning curves](learning_curves.png)", ""]
    else:
        lines += ["No fold log found.", ""]
    return "\n".join(lines + SECTIONS[predicts](oof, ids, run_dir, gallery) +
                     noise_section(noise, predicts, oof, run_dir, gallery))


def write(exp: Experiment) -> Path:
    """Write runs/<comp>/<exp>/report.md, its PNGs and label_noise.csv (where the task's
    predictions carry a confidence) for the trained and predicted experiment; returns
    report.md's path."""
    run, comp = exp.run, exp.comp
    scores = json.loads(run.scores.read_text())
    source = run.oof_tta if run.oof_tta.is_file() else run.oof
    ids = list(comp.train["id"])
    table = pd.read_csv(source, dtype={"id": str}, keep_default_na=False).set_index("id").loc[ids]
    oof = OOF(list(comp.classes), comp.y, table[list(comp.classes)].to_numpy(np.float64),
              exp.folds, exp.images)
    noise = label_noise(comp.task, oof, ids, list(comp.train["target"]))
    if noise is not None:
        write_csv(noise.drop(columns="row"), run.label_noise)
    write_text(render(exp.cfg.experiment, comp.task.predicts, scores, read_logs(run), oof, ids,
                      run.dir, noise=noise), run.report)
    return run.report
