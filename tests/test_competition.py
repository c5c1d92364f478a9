"""The competition reader: ids, paths, classes and the submission format, with clear errors."""
import numpy as np
import pandas as pd
import pytest

from conftest import make_competition
from pipeline.core.competition import load_competition_data
from pipeline.core.config import load_competition
from pipeline.core.errors import UserError


def load(overrides=()):
    return load_competition_data(load_competition("configs/tiny/competition.yaml", list(overrides)))


def edit_train(root, fn):
    path = root / "data/tiny/train.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def test_reads_ids_classes_paths_and_label_format(tiny):
    comp = load()
    assert comp.classes == ("class_0", "class_1", "class_2")
    assert len(comp.train) == 24 and comp.train["path"].str.endswith(".png").all()
    assert comp.submission.format == "label" and comp.submission.id_column == "image_id"
    assert comp.submission.columns == ("target",)
    sample = pd.read_csv("data/tiny/sample_submission.csv")
    assert list(comp.test["id"]) == list(sample["image_id"])  # sample_submission's order
    assert list(comp.y[:8]) == [0] * 8


def proba_sample(root, columns):
    path = root / "data/tiny/sample_submission.csv"
    ids = pd.read_csv(path)["image_id"]
    pd.DataFrame({"image_id": ids, **{c: 0.25 for c in columns}}).to_csv(path, index=False)


def test_probability_format_takes_sample_column_order(tiny):
    proba_sample(tiny, ["class_2", "class_0", "class_1"])
    comp = load()
    assert comp.submission.format == "proba"
    assert comp.classes == ("class_2", "class_0", "class_1")


def test_binary_probability_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "data/tiny", n_classes=2)
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "target": 0.5}).to_csv(
        tmp_path / "data/tiny/sample_submission.csv", index=False)
    from conftest import COMPETITION, write_yaml
    write_yaml(tmp_path / "configs/tiny/competition.yaml", COMPETITION)
    comp = load()
    assert comp.submission.format == "binary_proba" and comp.submission.positive_class == "class_1"


def test_ids_with_extension_and_nested_folders(tiny):
    edit_train(tiny, lambda df: df.assign(image_id=df["image_id"] + ".png"))
    (tiny / "data/tiny/train/sub").mkdir()
    (tiny / "data/tiny/train/tr0000.png").rename(tiny / "data/tiny/train/sub/tr0000.png")
    comp = load()
    assert comp.train["path"].iloc[0].endswith("train/sub/tr0000.png")


def test_integer_labels_sort_numerically(tiny):
    edit_train(tiny, lambda df: df.assign(target=df["target"].map(
        {"class_0": "10", "class_1": "2", "class_2": "1"})))
    assert load().classes == ("1", "2", "10")


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.drop(columns="target"), "train.csv: no column 'target' (set by data.target_column)"),
    (lambda df: df.drop(columns="image_id"), "train.csv: no column 'image_id' (set by data.id_column)"),
    (lambda df: pd.concat([df, df.iloc[[3]]]), "train.csv: row 26: duplicate id 'tr0003'"),
    (lambda df: df.assign(target=df["target"].where(df.index != 5, "")),
     "train.csv: row 7: empty target for id 'tr0005'"),
    (lambda df: df.assign(target=df["target"].where(df.index != 6, "NaN")),
     "train.csv: row 8: empty target"),
])
def test_train_table_errors_name_file_and_row(tiny, edit, message):
    edit_train(tiny, edit)
    with pytest.raises(UserError) as err:
        load()
    assert message in str(err.value)


def test_missing_and_empty_images(tiny):
    (tiny / "data/tiny/train/tr1002.png").unlink()
    with pytest.raises(UserError, match=r"train.csv: row 12: no image file for id 'tr1002'"):
        load()
    (tiny / "data/tiny/train/tr1002.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"train.csv: row 12: image file .*tr1002.png is empty"):
        load()
    comp = load(["data.on_bad_image=skip"])
    assert len(comp.train) == 23 and "tr1002" not in set(comp.train["id"])
    assert len(comp.skipped) == 1


def test_sample_submission_errors(tiny):
    (tiny / "data/tiny/test/te002.png").unlink()
    with pytest.raises(UserError, match=r"sample_submission.csv: row \d+: no image file for id 'te002'"):
        load()
    pd.DataFrame({"image_id": ["te000"], "a": [1], "b": [2]}).to_csv(
        tiny / "data/tiny/sample_submission.csv", index=False)
    with pytest.raises(UserError, match="columns fit neither format"):
        load()
    (tiny / "data/tiny/sample_submission.csv").unlink()
    with pytest.raises(UserError, match="sample_submission.csv: file not found"):
        load()


def test_a_sample_column_no_train_row_has_is_refused_unless_allowed(tiny):
    """Nothing can learn class_9: refused in one line naming it, or predicted as never seen."""
    proba_sample(tiny, ["class_0", "class_1", "class_2", "class_9"])
    with pytest.raises(UserError, match="column 'class_9' is a class no train row has"):
        load()
    assert load(["submission.allow_untrained_columns=true"]).classes[-1] == "class_9"


def test_group_column_must_exist(tiny):
    with pytest.raises(UserError, match="no column 'site' \\(set by data.group_column\\)"):
        load(["data.group_column=site"])


def test_multilabel_targets_from_label_columns_and_from_one_separated_column(tiny):
    from conftest import COMPETITION, write_yaml
    from pipeline.core.config import load_competition

    train = pd.read_csv("data/tiny/train.csv", dtype=str)
    train["lab_cat"] = ["1", "0"] * 12
    train["lab_dog"] = ["1", "1", "0"] * 8
    train.to_csv("data/tiny/train.csv", index=False)
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "cat": 0, "dog": 1}).to_csv(
        "data/tiny/sample_submission.csv", index=False)
    write_yaml(tiny / "configs/tiny/competition.yaml",
               {**COMPETITION, "task": "multilabel", "metric": "micro_f1",
                "data": {**COMPETITION["data"], "target_prefix": "lab_"}})
    comp = load_competition_data(load_competition("configs/tiny/competition.yaml"))
    assert comp.classes == ("cat", "dog") and comp.y.dtype == np.float32
    assert comp.y[:3].tolist() == [[1, 1], [0, 1], [1, 0]]
    assert comp.submission.format == "columns" and comp.submission.binary_columns
    train.assign(target=["cat dog", "dog", "cat", ""] * 6).to_csv("data/tiny/train.csv", index=False)
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "tags": ""}).to_csv(
        "data/tiny/sample_submission.csv", index=False)
    write_yaml(tiny / "configs/tiny/competition.yaml",
               {**COMPETITION, "task": "multilabel", "metric": "micro_f1"})
    comp = load_competition_data(load_competition("configs/tiny/competition.yaml"))
    assert comp.submission.format == "labels" and comp.y[:4].tolist() == [[1, 1], [0, 1], [1, 0], [0, 0]]


def test_the_metric_decides_between_probabilities_and_decisions(tiny):
    """A 0/1 sample (as RANZCR's and SIIM's) gets probabilities under AUC or log loss, and
    decisions under a metric that scores them; a label column no train row has is refused."""
    from conftest import COMPETITION, write_yaml
    from pipeline.core.config import load_competition

    train = pd.read_csv("data/tiny/train.csv", dtype=str)
    train.assign(lab_cat=["1", "0"] * 12, lab_dog=["1", "1", "0"] * 8).to_csv(
        "data/tiny/train.csv", index=False)
    sample = pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "cat": 0, "dog": 1})
    sample.to_csv("data/tiny/sample_submission.csv", index=False)
    multilabel = {**COMPETITION, "task": "multilabel",
                  "data": {**COMPETITION["data"], "target_prefix": "lab_"}}
    for metric, binary in (("roc_auc", False), ("log_loss", False), ("macro_f1", True)):
        write_yaml(tiny / "configs/tiny/competition.yaml", {**multilabel, "metric": metric})
        comp = load_competition_data(load_competition("configs/tiny/competition.yaml"))
        assert comp.submission.binary_columns == binary, metric
    sample.assign(bird=0).to_csv("data/tiny/sample_submission.csv", index=False)
    with pytest.raises(UserError, match="column 'bird' is a label no train row has"):
        load_competition_data(load_competition("configs/tiny/competition.yaml"))


@pytest.mark.parametrize("metric, expected", [("roc_auc", "binary_proba"), ("accuracy", "label")])
def test_a_two_class_label_sample_gets_the_positive_probability_under_auc(tmp_path, monkeypatch,
                                                                          metric, expected):
    from conftest import COMPETITION, make_competition, write_yaml
    from pipeline.core.config import load_competition

    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "data/tiny", n_classes=2)
    train = pd.read_csv("data/tiny/train.csv", dtype=str)
    train.assign(target=train["target"].str[-1]).to_csv("data/tiny/train.csv", index=False)
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "target": 0}).to_csv(
        "data/tiny/sample_submission.csv", index=False)
    write_yaml(tmp_path / "configs/tiny/competition.yaml", {**COMPETITION, "metric": metric})
    comp = load_competition_data(load_competition("configs/tiny/competition.yaml"))
    assert comp.submission.format == expected and comp.classes == ("0", "1")


def test_data_exclude_drops_listed_ids_or_a_csvs_before_folds(tiny, capsys):
    from pipeline import folds
    comp = load(["data.exclude=[tr0001, tr1002]"])
    assert len(comp.train) == len(comp.y) == 22 and not {"tr0001", "tr1002"} & set(comp.train["id"])
    assert comp.classes == ("class_0", "class_1", "class_2")
    assert capsys.readouterr().err.strip() == \
        "data.exclude: dropped 2 of 24 train rows (data.exclude)"
    pd.DataFrame({"id": ["tr2005", "tr2005"], "label": "class_2", "predicted": "class_0",
                  "confidence": 0.95}).to_csv(tiny / "configs/tiny/noise.csv", index=False)
    comp = load(["data.exclude=noise.csv"])  # relative to the competition config's folder
    assert len(comp.train) == 23 and "tr2005" not in set(comp.train["id"])
    assert "dropped 1 of 24 train rows (configs/tiny/noise.csv (data.exclude))" in \
        capsys.readouterr().err
    folds.main(["configs/tiny/competition.yaml", "data.exclude=noise.csv"])
    written = pd.read_csv(tiny / "folds/tiny.csv", dtype=str)
    assert len(written) == 23 and "tr2005" not in set(written["id"])


def test_data_exclude_refuses_an_id_the_train_table_lacks_in_one_line(tiny, capsys):
    from pipeline import folds
    with pytest.raises(SystemExit) as exit_info:
        folds.main(["configs/tiny/competition.yaml", "data.exclude=[tr0001, nope]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        "error: data.exclude: id 'nope' is not in the train table data/tiny/train.csv"]
    pd.DataFrame({"image_id": ["tr0001"]}).to_csv(tiny / "configs/tiny/noise.csv", index=False)
    with pytest.raises(UserError, match=r"configs/tiny/noise.csv: no column 'id' \(set by "
                                        r"data.exclude\)"):
        load(["data.exclude=noise.csv"])
