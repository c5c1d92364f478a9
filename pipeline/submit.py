"""Stage 5: the blended test predictions -> submissions/<comp>.csv in sample_submission's format.

Same id column, ids and order as sample_submission.csv; a label column (class names or grades
as written in the train table), one probability column per class or label in
sample_submission's column order (0/1 where the sample holds 0/1), one positive-class
probability, the predicted labels joined in one column, or one value. Decisions use the
ensemble's tuned thresholds (weights.json) where it chose some. Written atomically,
validated by re-reading.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics, thresholds
from pipeline.artifacts import atomic_path
from pipeline.competition import SubmissionFormat, load_competition_data
from pipeline.config import load_ensemble
from pipeline.errors import UserError, cli, stage_args


def grade_names(task) -> list[str]:
    """An ordinal task's grades as the train table spells them (integers without a point)."""
    return [str(int(g)) if float(g).is_integer() else str(g) for g in task.grades]


def format_submission(fmt: SubmissionFormat, task, ids: list[str], pred: np.ndarray,
                      thresholds=None) -> pd.DataFrame:
    """Predictions (rows in `ids` order, columns `task.columns`) -> sample_submission layout.

    Rows follow sample_submission's ids (matched after stripping spaces). Class probabilities
    are clipped to [1e-7, 1] and renormalised before the argmax or the columns are taken.
    Decisions (a label, labels, 0/1 columns, a grade) use `thresholds` (pipeline.thresholds)
    where given, else the defaults: argmax, 0.5 per label, rounding to the nearest grade.
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
    if task.kind == "ordinal" and fmt.kind == "label":
        cuts = task.cuts() if thresholds is None else thresholds[1]
        grades = task.grade(pred[:, 0], cuts)
        spelled = dict(zip(task.grades.tolist(), grade_names(task)))
        out[fmt.columns[0]] = [spelled[g] for g in grades.tolist()]
    elif fmt.kind == "label":
        hard = metrics.decisions(pred, thresholds)
        out[fmt.columns[0]] = np.asarray(classes, dtype=object)[hard]
    elif fmt.kind == "binary_proba":
        out[fmt.columns[0]] = pred[:, classes.index(fmt.positive_class)]
    elif fmt.kind == "value":
        out[fmt.columns[0]] = pred[:, 0]
    elif fmt.kind == "labels":
        hard = metrics.decisions(pred, thresholds, per_label=True)
        sep = task.extra["separator"]
        out[fmt.columns[0]] = [sep.join(c for c, on in zip(classes, row) if on) for row in hard]
    else:  # proba, columns
        if fmt.binary_columns:
            pred = metrics.decisions(pred, thresholds, per_label=True)
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
    if fmt.kind == "label":
        known = grade_names(task) if task.kind == "ordinal" else list(task.columns)
        if not values.iloc[:, 0].isin(known).all():
            raise UserError(f"{path}: has labels that are not train classes")
        return
    if fmt.kind == "labels":
        sep = task.extra["separator"]
        found = {p for v in values.iloc[:, 0] for p in v.split(sep) if p}
        if not found <= set(task.columns):
            raise UserError(f"{path}: has labels that are not train labels, e.g. "
                            f"{sorted(found - set(task.columns))[0]!r}")
        return
    numbers = values.apply(pd.to_numeric, errors="coerce").to_numpy()
    ok = np.isfinite(numbers)
    if fmt.kind != "value":
        ok &= (numbers >= 0) & (numbers <= 1)
    if not ok.all():
        raise UserError(f"{path}: has empty, NaN or out-of-range values")


def write_submission(df: pd.DataFrame, path: Path, fmt: SubmissionFormat, task) -> None:
    """Write atomically; the file only takes its name once the re-read validation passed."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
        validate_submission(tmp, fmt, task)


def read_thresholds(weights_path: Path):
    """The ensemble's chosen decision thresholds (weights.json), or None for the defaults."""
    if not weights_path.is_file():
        return None
    return thresholds.from_json(json.loads(weights_path.read_text()).get("thresholds"))


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml")
    cfg = load_ensemble(args.config, args.overrides)
    comp = load_competition_data(cfg)
    blended_path = cfg.run_dir / "test.csv"
    if not blended_path.is_file():
        raise UserError(f"{blended_path}: not found; run the ensemble stage first")
    blended = pd.read_csv(blended_path, dtype={"id": str}, keep_default_na=False)
    classes = list(comp.classes)
    lacking = [c for c in classes if c not in blended.columns]
    if lacking:
        raise UserError(f"{blended_path}: no column for class {lacking[0]!r}; "
                        f"rerun the ensemble stage")
    df = format_submission(comp.submission, comp.task, list(blended["id"]),
                           blended[classes].to_numpy(), read_thresholds(cfg.run_dir / "weights.json"))
    out = Path("submissions") / f"{cfg.name}.csv"
    write_submission(df, out, comp.submission, comp.task)
    print(f"wrote {out}: {len(df)} rows, format {comp.submission.kind}", file=sys.stderr)


if __name__ == "__main__":
    main()
