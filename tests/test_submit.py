"""The submission writer: label, binary-probability and multi-class-probability formats."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import COMPETITION, make_competition, write_yaml
from pipeline import submit as submit_stage
from pipeline.core import submission as submit, tasks
from pipeline.core.submission import SubmissionFormat
from pipeline.core.errors import UserError

FOLDER_IDS = [f"te{i:03d}" for i in range(6)]  # the test folder's order
SAMPLE_IDS = FOLDER_IDS[::-1]  # conftest writes sample_submission in reversed order


def competition(tmp_path, monkeypatch, n_classes, sample):
    """A tiny competition with the given sample_submission layout; cwd is set to tmp_path."""
    monkeypatch.chdir(tmp_path)
    root = make_competition(tmp_path / "data/tiny", n_classes=n_classes, per_class=2,
                            sample="label" if sample == "label" else "proba")
    if sample == "binary":
        pd.DataFrame({"image_id": SAMPLE_IDS, "target": 0.5}).to_csv(
            root / "sample_submission.csv", index=False)
    write_yaml(tmp_path / "configs/tiny/competition.yaml", COMPETITION)
    write_yaml(tmp_path / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["x"]})


def blended(classes):
    """runs/tiny/ensemble/test.csv in the test folder's order: row i predicts class i % K."""
    k = len(classes)
    proba = np.full((6, k), 0.1 / (k - 1))
    proba[np.arange(6), np.arange(6) % k] = 0.9
    df = pd.DataFrame(proba, columns=classes)
    df.insert(0, "id", FOLDER_IDS)
    path = Path("runs/tiny/ensemble")
    path.mkdir(parents=True)
    df.to_csv(path / "test.csv", index=False)
    return proba


def test_label_submission_follows_sample_order_with_train_class_names(tmp_path, monkeypatch):
    competition(tmp_path, monkeypatch, 3, "label")
    blended(["class_0", "class_1", "class_2"])
    submit_stage.main(["configs/tiny/ensemble.yaml"])
    sub = pd.read_csv("submissions/tiny.csv", dtype=str)
    assert list(sub.columns) == ["image_id", "target"] and list(sub["image_id"]) == SAMPLE_IDS
    assert list(sub["target"]) == [f"class_{int(i[2:]) % 3}" for i in SAMPLE_IDS]


def test_binary_probability_submission_has_the_positive_class_column(tmp_path, monkeypatch):
    competition(tmp_path, monkeypatch, 2, "binary")
    proba = blended(["class_0", "class_1"])
    submit_stage.main(["configs/tiny/ensemble.yaml"])
    sub = pd.read_csv("submissions/tiny.csv", dtype={"image_id": str})
    assert list(sub.columns) == ["image_id", "target"] and list(sub["image_id"]) == SAMPLE_IDS
    np.testing.assert_allclose(sub["target"], proba[::-1, 1], rtol=1e-5)


def test_multiclass_probability_submission_in_sample_column_order(tmp_path, monkeypatch):
    competition(tmp_path, monkeypatch, 4, "proba")
    sample = pd.read_csv("data/tiny/sample_submission.csv")
    reordered = sample[["image_id", "class_2", "class_0", "class_3", "class_1"]]
    reordered.to_csv("data/tiny/sample_submission.csv", index=False)
    proba = blended(["class_0", "class_1", "class_2", "class_3"])
    submit_stage.main(["configs/tiny/ensemble.yaml"])
    sub = pd.read_csv("submissions/tiny.csv", dtype={"image_id": str})
    assert list(sub.columns) == list(reordered.columns) and list(sub["image_id"]) == SAMPLE_IDS
    np.testing.assert_allclose(sub[["class_0", "class_1", "class_2", "class_3"]], proba[::-1],
                               rtol=1e-5)
    assert not sub.isna().any().any()


FMT = SubmissionFormat("id", "proba", ("b", "a"), ("r2", "r1"))
AB = tasks.Multiclass(["a", "b"])


def test_probabilities_are_clipped_and_renormalised_in_sample_order():
    out = submit.format_submission(FMT, AB, ["r1", "r2"],
                                   np.array([[0.0, 1.0], [0.6, 0.6]]))
    assert list(out.columns) == ["id", "b", "a"] and list(out["id"]) == ["r2", "r1"]
    np.testing.assert_allclose(out[["a", "b"]], [[0.5, 0.5], [1e-7 / (1 + 1e-7), 1 / (1 + 1e-7)]])


def test_refuses_missing_ids_and_nan():
    with pytest.raises(UserError, match="lack 1 sample_submission ids, e.g. 'r2'"):
        submit.format_submission(FMT, AB, ["r1"], np.array([[0.5, 0.5]]))
    with pytest.raises(UserError, match="NaN"):
        submit.format_submission(FMT, AB, ["r1", "r2"], np.array([[np.nan, 1], [0.5, 0.5]]))


@pytest.mark.parametrize("text, message", [
    ("id,a,b\nr2,0.5,0.5\nr1,0.5,0.5\n", "columns"),
    ("id,b,a\nr1,0.5,0.5\nr2,0.5,0.5\n", "ids or their order"),
    ("id,b,a\nr2,0.5,\nr1,0.5,0.5\n", "empty, NaN or out-of-range"),
    ("id,b,a\nr2,0.5,1.5\nr1,0.5,0.5\n", "empty, NaN or out-of-range"),
])
def test_validation_rejects_files_that_do_not_match_the_sample(tmp_path, text, message):
    path = tmp_path / "sub.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        submit.validate_submission(path, FMT, AB)


def test_a_failed_validation_leaves_no_file(tmp_path):
    bad = pd.DataFrame({"id": ["r1", "r2"], "b": [0.5, 0.5], "a": [0.5, 0.5]})  # wrong order
    with pytest.raises(UserError):
        submit.write_submission(bad, tmp_path / "sub.csv", FMT, AB)
    assert list(tmp_path.iterdir()) == []

