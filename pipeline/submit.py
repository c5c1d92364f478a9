"""Stage 5: the blended test probabilities -> submissions/<comp>.csv in sample_submission's format.

Same id column, ids and order as sample_submission.csv; a label column (class names as
written in the train table), one probability column per class in sample_submission's
column order, or one positive-class probability. Written atomically, validated by re-reading.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import atomic_path
from pipeline.competition import SubmissionFormat, load_competition_data
from pipeline.config import load_ensemble
from pipeline.errors import UserError, cli, stage_args


def format_submission(fmt: SubmissionFormat, classes: list[str], ids: list[str],
                      proba: np.ndarray) -> pd.DataFrame:
    """Probabilities (rows in `ids` order, columns in `classes` order) -> sample_submission layout.

    Rows follow sample_submission's ids (matched after stripping spaces); probabilities are
    clipped to [1e-7, 1] and renormalised before the argmax or the columns are taken.
    """
    position = {i: r for r, i in enumerate(ids)}
    missing = [i for i in fmt.ids if i.strip() not in position]
    if missing:
        raise UserError(f"predictions lack {len(missing)} sample_submission ids, "
                        f"e.g. {missing[0]!r}")
    proba = np.asarray(proba, dtype=np.float64)[[position[i.strip()] for i in fmt.ids]]
    if not np.isfinite(proba).all():
        raise UserError("predictions contain NaN or infinite values")
    proba = np.clip(proba, 1e-7, 1.0)
    proba /= proba.sum(axis=1, keepdims=True)
    out = pd.DataFrame({fmt.id_column: list(fmt.ids)})
    if fmt.kind == "label":
        out[fmt.columns[0]] = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    elif fmt.kind == "binary_proba":
        out[fmt.columns[0]] = proba[:, classes.index(fmt.positive_class)]
    else:
        col = {c: i for i, c in enumerate(classes)}
        for name in fmt.columns:
            out[name] = proba[:, col[name]]
    return out


def validate_submission(path: Path, fmt: SubmissionFormat, classes: list[str]) -> None:
    """Re-read the written file and check it against the sample submission's layout: columns,
    ids and their order, no empty values, known labels or probabilities in [0, 1]."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != [fmt.id_column, *fmt.columns]:
        raise UserError(f"{path}: columns {list(df.columns)} differ from sample_submission's")
    if tuple(df[fmt.id_column]) != fmt.ids:
        raise UserError(f"{path}: ids or their order differ from sample_submission's")
    values = df[list(fmt.columns)]
    if fmt.kind == "label":
        if not values.iloc[:, 0].isin(classes).all():
            raise UserError(f"{path}: has labels that are not train classes")
        return
    numbers = values.apply(pd.to_numeric, errors="coerce").to_numpy()
    if not (np.isfinite(numbers) & (numbers >= 0) & (numbers <= 1)).all():
        raise UserError(f"{path}: has empty, NaN or out-of-range probabilities")


def write_submission(df: pd.DataFrame, path: Path, fmt: SubmissionFormat,
                     classes: list[str]) -> None:
    """Write atomically; the file only takes its name once the re-read validation passed."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
        validate_submission(tmp, fmt, classes)


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
    df = format_submission(comp.submission, classes, list(blended["id"]),
                           blended[classes].to_numpy())
    out = Path("submissions") / f"{cfg.name}.csv"
    write_submission(df, out, comp.submission, classes)
    print(f"wrote {out}: {len(df)} rows, format {comp.submission.kind}", file=sys.stderr)


if __name__ == "__main__":
    main()
