"""Decision thresholds and the new submission formats: tuned beats the default on miscalibrated
predictions, nested CV is scored on held-out folds, and submit applies them."""
import numpy as np
import pandas as pd
import pytest

from pipeline.core import metrics, submission as submit, tasks, thresholds
from pipeline.core.submission import SubmissionFormat
from pipeline.core.errors import UserError

RNG = np.random.default_rng(0)
LABELS = tasks.Multilabel(["a", "b", "c"])
ORDINAL = tasks.Ordinal(["grade"], 0, 4, "mse", [0, 1, 2, 3, 4])


def shrunk_labels(n=300):
    """Label probabilities that rank well but sit below 0.5: the default threshold misses them."""
    y = (RNG.random((n, 3)) < 0.4).astype(np.float32)
    return y, 0.3 * y + 0.25 * RNG.random((n, 3))


def shrunk_grades(n=300):
    """Grade predictions pulled towards the middle grade: rounding under-uses the extremes."""
    y = RNG.integers(0, 5, n).astype(np.float64)
    return y, (2 + 0.5 * (y - 2) + RNG.normal(0, 0.2, n)).reshape(-1, 1)


def test_multilabel_thresholds_beat_the_default_in_sample_and_nested():
    y, p = shrunk_labels()
    which = LABELS.threshold_kind("macro_f1")
    default = metrics.score("macro_f1", LABELS, y, p, thresholds.default(which, LABELS))
    tuned = thresholds.fit(which, "macro_f1", y, p, LABELS)
    folds = np.arange(len(y)) % 3
    nested, per_fold = thresholds.nested(which, "macro_f1", y, p, folds, LABELS)
    assert default < 0.5 and metrics.score("macro_f1", LABELS, y, p, tuned) > 0.9 and nested > 0.85
    assert set(per_fold) == {0, 1, 2} and np.all(tuned < 0.5)


def test_ordinal_cut_points_beat_rounding():
    y, p = shrunk_grades()
    which = ORDINAL.threshold_kind("qwk")
    rounding = metrics.score("qwk", ORDINAL, y, p)
    cuts = thresholds.fit(which, "qwk", y, p, ORDINAL)
    nested, _ = thresholds.nested(which, "qwk", y, p, np.arange(len(y)) % 3, ORDINAL)
    assert metrics.score("qwk", ORDINAL, y, p, cuts) > rounding and nested > rounding
    assert np.all(np.diff(cuts[1]) > 0)
    assert thresholds.from_json(thresholds.to_json(which, cuts))[1].tolist() == cuts[1].tolist()


def test_metrics_that_score_predictions_need_no_thresholds():
    assert LABELS.threshold_kind("roc_auc") is None and ORDINAL.threshold_kind("rmse") is None
    assert tasks.Multiclass(["x", "y", "z"]).threshold_kind("accuracy") is None
    assert tasks.Binary(["x", "y"]).threshold_kind("accuracy") == "positive"


def test_labels_and_columns_formats_apply_thresholds():
    pred = np.array([[0.45, 0.1, 0.9], [0.2, 0.6, 0.1]])
    fmt = SubmissionFormat("id", "labels", ("tags",), ("r2", "r1"))
    out = submit.format_submission(fmt, LABELS, ["r1", "r2"], pred)
    assert out["tags"].tolist() == ["b", "c"]
    out = submit.format_submission(fmt, LABELS, ["r1", "r2"], pred, np.array([0.4, 0.5, 0.5]))
    assert out["tags"].tolist() == ["b", "a c"]
    cols = SubmissionFormat("id", "columns", ("c", "a", "b"), ("r1",), binary_columns=True)
    out = submit.format_submission(cols, LABELS, ["r1", "r2"], pred)
    assert out[["c", "a", "b"]].values.tolist() == [[1, 0, 0]]


def test_ordinal_label_and_regression_value_formats(tmp_path):
    fmt = SubmissionFormat("id", "label", ("grade",), ("r1", "r2", "r3"))
    pred = np.array([[0.4], [2.6], [9.0]])
    out = submit.format_submission(fmt, ORDINAL, ["r1", "r2", "r3"], pred)
    assert out["grade"].tolist() == ["0", "3", "4"]
    cuts = (np.asarray(ORDINAL.grades), np.array([0.3, 1.5, 2.7, 3.5]))
    assert submit.format_submission(fmt, ORDINAL, ["r1", "r2", "r3"], pred, cuts)["grade"].tolist() \
        == ["1", "2", "4"]
    value = SubmissionFormat("id", "value", ("y",), ("r1",))
    reg = tasks.Regression(["y"], 0, 100)
    out = submit.format_submission(value, reg, ["r1"], np.array([[42.5]]))
    submit.write_submission(out, tmp_path / "sub.csv", value, reg)
    assert pd.read_csv(tmp_path / "sub.csv")["y"].tolist() == [42.5]


def test_validation_refuses_unknown_labels(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("id,tags\nr1,a zebra\n")
    with pytest.raises(UserError, match="not train labels, e.g. 'zebra'"):
        submit.validate_submission(path, SubmissionFormat("id", "labels", ("tags",), ("r1",)),
                                   LABELS)


def test_a_value_format_scored_by_grades_writes_the_grades_at_the_tuned_cut_points():
    """Ordinal `id,value` under QWK: the written numbers are the grades the tuned cut points give
    (writing raw values would let the scorer round them at the default cuts)."""
    pred = np.array([[0.4], [2.6], [9.0]])
    cuts = (np.asarray(ORDINAL.grades), np.array([0.3, 1.5, 2.7, 3.5]))
    decided = SubmissionFormat("id", "value", ("grade",), ("r1", "r2", "r3"), decided=True)
    assert submit.format_submission(decided, ORDINAL, ["r1", "r2", "r3"], pred, cuts)["grade"] \
        .tolist() == [1.0, 2.0, 4.0]
    raw = SubmissionFormat("id", "value", ("grade",), ("r1", "r2", "r3"))
    assert submit.format_submission(raw, ORDINAL, ["r1", "r2", "r3"], pred)["grade"].tolist() == \
        [0.4, 2.6, 9.0]
