"""The per-experiment report: its numbers on a known OOF, and the files predict writes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import EXPERIMENT, write_yaml
from pipeline.core import tasks
from pipeline.reports import experiment as er
from pipeline import folds, predict, train


def known_oof() -> er.OOF:
    """Six rows, three classes: rows 1 and 4 wrong, row 4 the more confident mistake."""
    proba = np.array([[0.9, 0.05, 0.05], [0.35, 0.55, 0.1], [0.05, 0.85, 0.1],
                      [0.15, 0.2, 0.65], [0.05, 0.9, 0.05], [0.05, 0.1, 0.85]])
    images = np.zeros((6, 8, 8, 1), np.uint8)
    return er.OOF(["a", "b", "c"], np.array([0, 0, 1, 2, 2, 2]), proba, np.array([0, 1] * 3), images)


def test_confident_mistakes_come_most_confident_first():
    assert er.confident_mistakes(known_oof(), 5).tolist() == [4, 1]
    assert er.confident_mistakes(known_oof(), 1).tolist() == [4]


def test_label_noise_lists_confident_contradictions_with_their_images(tmp_path):
    """Row 4 (true c) is predicted b at 0.90 with c at 0.05: a candidate; row 1's mistake is
    not confident. Labels: a label contradicted at >= 0.9 either way. Values: not listed."""
    oof = known_oof()
    task = tasks.Multiclass(("a", "b", "c"))
    ids, labels = [f"r{i}" for i in range(6)], ["A", "A", "B", "C", "C", "C"]
    noise = er.label_noise(task, oof, ids, labels)
    assert noise.drop(columns="row").to_dict("records") == [
        dict(id="r4", label="C", predicted="b", confidence=0.9)]
    lines = er.noise_section(noise, "classes", oof, tmp_path, 18)
    assert "1 train rows whose OOF prediction contradicts their label" in lines[2]
    assert (tmp_path / "label_noise.png").read_bytes()[:4] == b"\x89PNG"
    labels_task = tasks.Multilabel(("x", "y"))
    y = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    proba = np.array([[0.95, 0.5], [0.2, 0.92], [0.05, 0.97]])
    found = labels_task.label_noise(y, proba, er.NOISE_LEVEL)
    assert found["row"].tolist() == [2] and found["predicted"].tolist() == ["y"]
    assert found["confidence"].tolist() == [pytest.approx(0.95)]
    values = er.OOF(["v"], np.arange(3.0), np.arange(3.0)[:, None], np.zeros(3), oof.images[:3])
    assert er.label_noise(tasks.Regression(("v",)), values, ids[:3], labels[:3]) is None
    assert "carry no confidence" in er.noise_section(None, "values", values, tmp_path, 18)[2]


def test_calibration_bins_and_expected_calibration_error():
    table = er.calibration(known_oof(), bins=5)  # bins [0,.2) ... [.8,1]
    filled = table.dropna()
    assert filled.index.tolist() == [2, 3, 4]
    assert filled.loc[4, "n"] == 4 and filled.loc[4, "accuracy"] == pytest.approx(0.75)
    assert filled.loc[4, "confidence"] == pytest.approx(0.875)
    assert (filled.loc[2, "accuracy"], filled.loc[3, "accuracy"]) == (0.0, 1.0)  # rows 1, 3
    # (|0.55 - 0| + |0.65 - 1| + 4 |0.875 - 0.75|) / 6 rows
    assert er.expected_calibration_error(table) == pytest.approx(1.4 / 6)


def test_per_class_table_and_stage_starts():
    lines = er.per_class_table(known_oof()).splitlines()
    assert lines[2] == "| a | 1.000 | 0.500 | 0.667 | 2 |"
    assert lines[4] == "| c | 1.000 | 0.667 | 0.800 | 3 |"
    log = pd.DataFrame({"epoch": range(5), "stage": [0, 1, 1, 2, 2]})
    assert er.stage_starts(log) == [1, 3]


def test_predict_writes_the_report_with_small_pngs(tiny):
    write_yaml(tiny / "configs/tiny/lenet5.yaml", {
        **EXPERIMENT, "finetune": {"stages": [{"epochs": 1, "train": "head"},
                                              {"epochs": 1, "train": "all"}]}})
    folds.main(["configs/tiny/competition.yaml"])
    train.main(["configs/tiny/lenet5.yaml"])
    predict.main(["configs/tiny/lenet5.yaml"])
    run_dir = tiny / "runs/tiny/lenet5"
    report = (run_dir / "report.md").read_text()
    for heading in ("## Learning curves", "## Per class (OOF)", "## Calibration",
                    "## Most confident mistakes", "## Label noise candidates (OOF)"):
        assert heading in report
    noise = pd.read_csv(run_dir / "label_noise.csv")
    assert list(noise.columns) == ["id", "label", "predicted", "confidence"]
    assert (noise["confidence"] >= er.NOISE_LEVEL).all()
    assert "| class_0 |" in report and "with TTA (none)" in report
    pngs = {p.name: p for p in run_dir.glob("*.png")}
    assert {"learning_curves.png", "confusion.png", "reliability.png"} <= set(pngs)
    assert ("mistakes.png" in pngs) == ("No OOF prediction is wrong." not in report)
    for path in pngs.values():
        assert path.stat().st_size < 150_000
        with Image.open(path) as img:
            assert img.format == "PNG" and max(img.size) <= 1000
