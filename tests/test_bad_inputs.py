"""The bad-input catalogue: exit code 2, one line naming the file, row or key, nothing written.

Each case breaks one thing in a tiny competition, runs the first stage that must notice,
and checks the exit code, the single stderr line, and that no file was added or changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import write_yaml
from pipeline import ensemble, folds, train


def snapshot(root: Path) -> dict:
    """Every file's modification time, less cache/ (memos of decoded images, not artifacts)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "cache" not in p.relative_to(root).parts}


def edit_csv(path: Path, fn) -> None:
    fn(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def run_stage(stage, argv, root: Path, capsys) -> str:
    """Run a stage's main; assert exit 2, one stderr line, no traceback, nothing written."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exc:
        stage.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert snapshot(root) == before, "a failing stage must not write or change files"
    return lines[0]


COMP = ["configs/tiny/competition.yaml"]
EXP = ["configs/tiny/lenet5.yaml"]
TRAIN_CSV = "data/tiny/train.csv"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (case id, how to break the tiny competition, stage, argv, expected text in the message)
READER_CASES = [
    ("missing train table", lambda r: (r / TRAIN_CSV).unlink(), "train.csv: file not found"),
    ("missing id column", lambda r: edit_csv(r / TRAIN_CSV, lambda d: d.drop(columns="image_id")),
     "train.csv: no column 'image_id' (set by data.id_column)"),
    ("missing target column", lambda r: edit_csv(r / TRAIN_CSV, lambda d: d.drop(columns="target")),
     "train.csv: no column 'target' (set by data.target_column)"),
    ("duplicate ids", lambda r: edit_csv(r / TRAIN_CSV, lambda d: pd.concat([d, d.iloc[[2]]])),
     "train.csv: row 26: duplicate id 'tr0002'"),
    ("empty target", lambda r: edit_csv(r / TRAIN_CSV, lambda d: d.assign(
        target=d["target"].where(d.index != 4, ""))), "train.csv: row 6: empty target for id 'tr0004'"),
    ("NaN target", lambda r: edit_csv(r / TRAIN_CSV, lambda d: d.assign(
        target=d["target"].where(d.index != 9, "nan"))), "train.csv: row 11: empty target for id 'tr1001'"),
    ("missing image", lambda r: (r / "data/tiny/train/tr2003.png").unlink(),
     "train.csv: row 21: no image file for id 'tr2003'"),
    ("zero-byte image", lambda r: (r / "data/tiny/train/tr2003.png").write_bytes(b""),
     "train.csv: row 21: image file data/tiny/train/tr2003.png is empty"),
    ("sample id without test image", lambda r: (r / "data/tiny/test/te001.png").unlink(),
     "sample_submission.csv: row 6: no image file for id 'te001'"),
    ("sample columns fit neither format", lambda r: pd.DataFrame(
        {"image_id": ["te000"], "x": [0.1], "y": [0.9]}).to_csv(
        r / "data/tiny/sample_submission.csv", index=False), "columns fit neither format"),
    ("class smaller than folds", lambda r: edit_csv(r / TRAIN_CSV, lambda d: d.assign(
        target=d["target"].where(d.index != 0, "lonely"))),
     "folds.n_splits: 2 folds but class 'lonely' has only 1 rows"),
    ("unknown config key", lambda r: write_yaml(r / COMP[0], {
        **yaml_of(r / COMP[0]), "fold": {"n_splits": 3}}), "competition.yaml: fold: unknown key"),
    ("wrong config type", lambda r: write_yaml(r / COMP[0], {
        **yaml_of(r / COMP[0]), "image_size": "big"}), "competition.yaml: image_size: "),
]


def yaml_of(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


def with_keys(r: Path, **keys) -> None:
    """Rewrite competition.yaml with `keys` set (sections merged one level deep)."""
    data = yaml_of(r / COMP[0])
    for key, value in keys.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    write_yaml(r / COMP[0], data)


def numeric_targets(r: Path, first: str) -> None:
    edit_csv(r / TRAIN_CSV, lambda d: d.assign(target=[first] + [str(i % 3) for i in range(1, len(d))]))
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "target": 0.5}).to_csv(
        r / "data/tiny/sample_submission.csv", index=False)


# the task cases: targets, metrics and formats that do not fit the task
TASK_CASES = [
    ("metric does not fit task", lambda r: with_keys(r, metric="rmse"),
     "metric: rmse does not fit task multiclass"),
    ("regression target not a number", lambda r: with_keys(r, task="regression", metric="rmse"),
     "train.csv: row 2: target 'class_0' is not a number"),
    ("regression target empty", lambda r: (numeric_targets(r, "nan"),
                                           with_keys(r, task="regression", metric="rmse")),
     "train.csv: row 2: empty target"),
    ("ordinal grade not an integer", lambda r: (numeric_targets(r, "1.5"),
                                                with_keys(r, task="ordinal", metric="qwk")),
     "task: ordinal needs integer grades"),
    ("label column not 0/1", lambda r: (edit_csv(r / TRAIN_CSV, lambda d: d.assign(
        a=["1"] + ["0"] * (len(d) - 1), b=["2"] * len(d))),
        with_keys(r, task="multilabel", metric="micro_f1",
                  data={"target_columns": ["a", "b"]})),
     "train.csv: row 2: column 'b' holds '2', not 0 or 1"),
    ("train label without a sample column", lambda r: (pd.DataFrame(
        {"image_id": [f"te{i:03d}" for i in range(6)], "class_0": 0.5, "class_1": 0.5}).to_csv(
        r / "data/tiny/sample_submission.csv", index=False),
        with_keys(r, task="multilabel", metric="micro_f1")),
     "sample_submission.csv: no column for label 'class_2'"),
    ("label columns for a single-label task", lambda r: with_keys(
        r, data={"target_columns": ["target"]}),
     "configs/tiny/competition.yaml: data.target_columns: 0/1 label columns are for task "
     "multilabel; task is multiclass"),
    ("format does not fit task", lambda r: with_keys(r, submission={"format": "labels"}),
     "submission.format: labels does not fit task multiclass"),
    ("user metric file missing", lambda r: with_keys(
        r, metric={"file": "nope.py", "function": "score", "direction": "maximize"}),
     "metric.file: configs/tiny/nope.py not found"),
    ("user metric function missing", lambda r: ((r / "configs/tiny/m.py").write_text(
        "def other(ids, y, p):\n    return 0.0\n"), with_keys(
        r, metric={"file": "m.py", "function": "score", "direction": "maximize"})),
     "metric.function: configs/tiny/m.py has no function 'score'"),
]


@pytest.mark.parametrize("case, breaker, message", TASK_CASES, ids=[c[0] for c in TASK_CASES])
def test_task_cases(tiny, capsys, case, breaker, message):
    breaker(tiny)
    line = run_stage(folds, COMP, tiny, capsys)
    assert message in line


@pytest.mark.parametrize("case, breaker, message", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader_and_config_cases(tiny, capsys, case, breaker, message):
    breaker(tiny)
    line = run_stage(folds, COMP, tiny, capsys)
    assert message in line


IMAGE_CASES = [
    ("corrupt image", lambda p: p.write_bytes(b"this is not a png at all" * 10)),
    ("truncated image", _truncate),
]


@pytest.mark.parametrize("case, breaker", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_undecodable_images_stop_the_folds_stage_before_any_work(tiny, capsys, case, breaker):
    breaker(tiny / "data/tiny/train/tr1004.png")
    line = run_stage(folds, COMP, tiny, capsys)
    assert line.startswith("error: data/tiny/train.csv: row 14: data/tiny/train/tr1004.png: "
                           "cannot decode image")
    assert not (tiny / "folds").exists()


def test_garbage_test_image_is_named_with_its_sample_submission_row(tiny, capsys):
    (tiny / "data/tiny/test/te002.png").write_bytes(b"\x00garbage" * 50)
    line = run_stage(folds, COMP, tiny, capsys)
    assert line.startswith("error: data/tiny/sample_submission.csv: row 5: "
                           "data/tiny/test/te002.png: cannot decode image")


def test_an_image_broken_after_the_folds_stage_stops_training(tiny, capsys):
    folds.main(COMP)
    _truncate(tiny / "data/tiny/train/tr1004.png")
    line = run_stage(train, EXP, tiny, capsys)
    assert "row 14: data/tiny/train/tr1004.png: cannot decode" in line


def test_unknown_backbone_suggests_close_names(tiny, capsys):
    folds.main(COMP)
    line = run_stage(train, EXP + ["model.backbone=resnet1"], tiny, capsys)
    assert "model.backbone: unknown model 'resnet1'" in line and "did you mean" in line


def test_pretrained_file_missing(tiny, capsys):
    folds.main(COMP)
    line = run_stage(train, EXP + ["model.pretrained=weights/nope.safetensors"], tiny, capsys)
    assert "model.pretrained: weights file weights/nope.safetensors not found" in line


def test_pretrained_file_for_another_architecture(tiny, capsys):
    folds.main(COMP)
    Path("weights").mkdir()
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, "weights/other.safetensors")
    line = run_stage(train, EXP + ["model.pretrained=weights/other.safetensors"], tiny, capsys)
    assert "model.pretrained: weights/other.safetensors does not fit 'lenet5'" in line


def _fake_run(root: Path, exp: str, fold_hash: str, fold: np.ndarray) -> None:
    run = root / "runs/tiny" / exp
    run.mkdir(parents=True)
    ids = pd.read_csv(root / TRAIN_CSV, dtype=str)["image_id"]
    proba = np.full((len(ids), 3), 1 / 3)
    oof = pd.DataFrame(proba, columns=["class_0", "class_1", "class_2"])
    oof.insert(0, "fold", fold)
    oof.insert(0, "id", ids)
    oof.to_csv(run / "oof_tta.csv", index=False)
    test_ids = pd.read_csv(root / "data/tiny/sample_submission.csv", dtype=str)["image_id"]
    test = pd.DataFrame(np.full((len(test_ids), 3), 1 / 3), columns=["class_0", "class_1", "class_2"])
    test.insert(0, "id", test_ids)
    test.to_csv(run / "test.csv", index=False)
    (run / "scores.json").write_text(json.dumps({"tag": f"cfg-{fold_hash}", "cv": 0.5}))


def test_blending_runs_built_on_different_folds(tiny, capsys):
    fold = np.arange(24) % 2
    _fake_run(tiny, "a", "foldsAAAA", fold)
    _fake_run(tiny, "b", "foldsBBBB", fold)
    write_yaml(tiny / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["a", "b"], "trials": 3})
    line = run_stage(ensemble, ["configs/tiny/ensemble.yaml"], tiny, capsys)
    assert "experiments 'a' and 'b' were trained on different fold files" in line


def test_output_folder_not_writable(tiny, capsys):
    Path("folds").write_text("a file where the folds folder should be")
    line = run_stage(folds, COMP, tiny, capsys)
    assert "folds: output folder is not writable" in line


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA", "L"])
def test_unusual_image_modes_are_converted_not_rejected(tiny, mode):
    path = tiny / "data/tiny/train/tr0000.png"
    rgb = Image.open(path).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    else:
        img = rgb.convert(mode)
    img.save(path.with_suffix(".tiff") if mode == "CMYK" else path)
    if mode == "CMYK":
        path.unlink()
        edit_csv(tiny / TRAIN_CSV, lambda d: d.assign(
            image_id=d["image_id"].where(d.index != 0, "tr0000.tiff")))
    folds.main(COMP)
    train.main(EXP + ["train.epochs=1"])
    assert (tiny / "runs/tiny/lenet5/oof.csv").is_file()


def test_a_group_column_typo_lists_only_the_tables_own_columns(tiny, capsys):
    """Multi-label 0/1 columns are joined into the target after the columns are checked: no
    phantom `label` column appears in the list."""
    train = pd.read_csv(tiny / "data/tiny/train.csv", dtype=str)
    train.assign(lab_cat=["1", "0"] * 12).drop(columns="target").to_csv(
        tiny / "data/tiny/train.csv", index=False)
    pd.DataFrame({"image_id": [f"te{i:03d}" for i in range(6)], "tags": ""}).to_csv(
        tiny / "data/tiny/sample_submission.csv", index=False)
    with_keys(tiny, task="multilabel", metric="micro_f1",
              data={"target_prefix": "lab_", "target_column": "label", "group_column": "sight"})
    line = run_stage(folds, COMP, tiny, capsys)
    assert line.endswith("no column 'sight' (set by data.group_column); columns are "
                         "['image_id', 'lab_cat']")


@pytest.mark.parametrize("suffix", [".jpg", "png"])
def test_an_image_suffix_no_file_has_is_pointed_out_once(tiny, capsys, suffix):
    with_keys(tiny, data={"image_suffix": suffix})
    folds.main(COMP)
    notes = [line for line in capsys.readouterr().err.splitlines() if "data.image_suffix" in line]
    assert len(notes) == 2  # once for the train table, once for the sample submission
    assert notes[0].startswith(f"note: data/tiny/train.csv: no image is named <id>{suffix}")
    assert "24 were found by their names without it" in notes[0]


def test_a_typo_in_any_experiment_stops_make_before_the_folds_stage(tiny, capsys):
    """make checks the whole config folder first (folds --check), so `trian:` in an experiment
    is one line naming its file and key, and no stage has run."""
    write_yaml(tiny / "configs/tiny/lenet5.yaml", {"competition": "competition.yaml",
                                                  "model": {"backbone": "lenet5"},
                                                  "trian": {"epochs": 2}})
    line = run_stage(folds, COMP + ["--check"], tiny, capsys)
    assert line == "error: configs/tiny/lenet5.yaml: trian: unknown key"
    assert not (tiny / "folds").exists() and not (tiny / "runs/tiny/train-data.json").exists()
