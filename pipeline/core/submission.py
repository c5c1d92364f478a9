"""The submission format, read from sample_submission.csv, and submissions written in it.

Same id column, ids and order as sample_submission.csv; a label column (class names or grades
as written in the train table), one probability column per class or label in
sample_submission's column order (0/1 where the sample holds 0/1), one positive-class
probability, the predicted labels joined in one column, or one value. Which formats fit a
task, and which one an unlabelled sample means, are the task's answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import metrics
from pipeline.core.artifacts import atomic_path
from pipeline.core.errors import UserError


@dataclass(frozen=True)
class SubmissionFormat:
    """What sample_submission.csv asks for.

    format: `label` (one class name or grade per row), `proba` (a column per class),
    `binary_proba` (one column: the probability of `positive_class`), `labels` (the predicted
    labels joined by the separator in one column), `columns` (a column per label: probabilities,
    or 0/1 when `binary_columns`) or `value` (one number per row).
    """

    id_column: str
    format: str
    columns: tuple[str, ...]
    ids: tuple[str, ...]
    positive_class: str | None = None
    binary_columns: bool = False
    decided: bool = False  # `value`: the metric scores decisions (grades), written as such

    def to_json(self) -> dict:
        return dict(id_column=self.id_column, format=self.format, columns=list(self.columns),
                    positive_class=self.positive_class, binary_columns=self.binary_columns,
                    decided=self.decided)


def _looks_fractional(values: pd.Series) -> bool:
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and ((numbers % 1) != 0).any())


def _only_01(sample: pd.DataFrame, columns: list[str]) -> bool:
    numbers = sample[columns].apply(pd.to_numeric, errors="coerce")
    return bool(numbers.isin([0, 1]).all().all()) and \
        all(set(sample[c]) <= {"0", "1"} for c in columns)


def _untrained(columns: list[str], classes: list[str], cfg, path: Path, what: str) -> None:
    """Refuse a sample column no train row has (its model output could only learn "never"),
    unless `submission.allow_untrained_columns`."""
    unseen = [c for c in columns if c not in classes]
    if unseen and not cfg.submission.allow_untrained_columns:
        raise UserError(f"{path}: column {unseen[0]!r} is a {what} no train row has, so nothing "
                        f"can learn it; set submission.allow_untrained_columns: true to predict "
                        f"it as never seen")


def infer_format(sample: pd.DataFrame, classes: list[str], task_cls, cfg,
                 path: Path) -> SubmissionFormat:
    """The format of `sample` for a task of class `task_cls` with prediction columns `classes`:
    `submission.format`, or the task's reading of the sample's columns and the metric
    (`auto`)."""
    cols = list(sample.columns)
    if len(cols) < 2:
        raise UserError(f"{path}: needs an id column and at least one value column; got {cols}")
    value_cols, kind = cols[1:], cfg.submission.format
    allowed = task_cls.submission_formats
    if kind != "auto" and kind not in allowed:
        raise UserError(f"submission.format: {kind} does not fit task {cfg.task}; use one of "
                        f"{list(allowed)}")
    decisions = metrics.is_user(cfg.metric) or metrics.needs_decisions(cfg.metric)
    if kind == "auto":
        kind = task_cls.auto_format(value_cols, classes, not decisions or
                                    _looks_fractional(sample[value_cols[0]]))
    positive, binary = None, False
    if kind == "proba":
        missing = [c for c in classes if c not in value_cols]
        if missing or len(value_cols) < 2:
            raise UserError(
                f"{path}: columns fit neither format: not 'id,<label>' and not one column per "
                f"class (train classes not among columns: {missing[:5]})"
            )
        _untrained(value_cols, classes, cfg, path, "class")
    elif kind == "columns":
        missing = [c for c in classes if c not in value_cols]
        if missing:
            raise UserError(f"{path}: no column for label {missing[0]!r}; columns are {cols}")
        _untrained(value_cols, classes, cfg, path, "label")
        binary = decisions and _only_01(sample, value_cols)
    elif len(value_cols) != 1:
        raise UserError(f"{path}: submission.format={kind} needs exactly two columns; got {cols}")
    if kind == "binary_proba":
        if len(classes) != 2:
            raise UserError(f"{path}: binary_proba needs 2 classes in train, found {len(classes)}")
        positive = cfg.submission.positive_class or classes[1]
        if positive not in classes:
            raise UserError(f"submission.positive_class: {positive!r} is not a class {classes}")
    return SubmissionFormat(cols[0], kind, tuple(value_cols), tuple(sample[cols[0]]), positive,
                            binary, kind == "value" and decisions and not metrics.is_user(cfg.metric))


def format_submission(fmt: SubmissionFormat, task, ids: list[str], pred: np.ndarray,
                      thresholds=None) -> pd.DataFrame:
    """Predictions (rows in `ids` order, columns `task.columns`) -> sample_submission layout.

    Rows follow sample_submission's ids (matched after stripping spaces). Class probabilities
    are clipped to [1e-7, 1] and renormalised before the argmax or the columns are taken.
    Decisions (a label, labels, 0/1 columns, a grade) are the task's, at `thresholds`
    (pipeline.core.thresholds) where given, else its defaults: argmax, 0.5 per label, rounding
    to the nearest grade.
    """
    position = {i: r for r, i in enumerate(ids)}
    missing = [i for i in fmt.ids if i.strip() not in position]
    if missing:
        raise UserError(f"predictions lack {len(missing)} sample_submission ids, "
                        f"e.g. {missing[0]!r}")
    pred = np.asarray(pred, dtype=np.float64)[[position[i.strip()] for i in fmt.ids]]
    if not np.isfinite(pred).all():
        raise UserError("predictions contain NaN or infinite values")
    classes = list(task.columns)
    out = pd.DataFrame({fmt.id_column: list(fmt.ids)})
    if task.simplex:
        pred = np.clip(pred, 1e-7, 1.0)
        pred /= pred.sum(axis=1, keepdims=True)
    if fmt.format == "label":
        out[fmt.columns[0]] = task.spell(task.decide(pred, thresholds))
    elif fmt.format == "binary_proba":
        out[fmt.columns[0]] = pred[:, classes.index(fmt.positive_class)]
    elif fmt.format == "value":
        out[fmt.columns[0]] = task.decide(pred, thresholds) if fmt.decided else pred[:, 0]
    elif fmt.format == "labels":
        out[fmt.columns[0]] = task.join(task.decide(pred, thresholds))
    else:  # proba, columns
        if fmt.binary_columns:
            pred = task.decide(pred, thresholds)
        col = {c: i for i, c in enumerate(classes)}
        for name in fmt.columns:
            out[name] = pred[:, col[name]]
    return out


def validate_submission(path: Path, fmt: SubmissionFormat, task) -> None:
    """Re-read the written file and check it against the sample submission's layout: columns,
    ids and their order, no empty values, known labels, probabilities in [0, 1], finite values."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != [fmt.id_column, *fmt.columns]:
        raise UserError(f"{path}: columns {list(df.columns)} differ from sample_submission's")
    if tuple(df[fmt.id_column]) != fmt.ids:
        raise UserError(f"{path}: ids or their order differ from sample_submission's")
    values = df[list(fmt.columns)]
    if fmt.format == "label":
        if not values.iloc[:, 0].isin(task.label_names).all():
            raise UserError(f"{path}: has labels that are not train classes")
        return
    if fmt.format == "labels":
        found = {p for v in values.iloc[:, 0] for p in v.split(task.separator) if p}
        if not found <= set(task.columns):
            raise UserError(f"{path}: has labels that are not train labels, e.g. "
                            f"{sorted(found - set(task.columns))[0]!r}")
        return
    numbers = values.apply(pd.to_numeric, errors="coerce").to_numpy()
    ok = np.isfinite(numbers)
    if fmt.format != "value":
        ok &= (numbers >= 0) & (numbers <= 1)
    if not ok.all():
        raise UserError(f"{path}: has empty, NaN or out-of-range values")


def write_submission(df: pd.DataFrame, path: Path, fmt: SubmissionFormat, task) -> None:
    """Write atomically; the file only takes its name once the re-read validation passed."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
        validate_submission(tmp, fmt, task)
