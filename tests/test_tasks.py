"""Every task kind learns, end to end: folds -> train -> predict -> ensemble -> submit on a tiny
digits competition, the CV clearly beating the trivial baseline (prior or mean prediction)."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline import ensemble, folds, infer, package, predict, submit, train
from pipeline.core import metrics
from task_data import make_task_competition

MARGIN = {"accuracy": 0.3, "roc_auc": 0.25, "macro_f1": 0.3, "rmse": -1.0, "qwk": 0.4}


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel", "regression", "ordinal"])
def test_each_task_learns_and_submits(tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    make_task_competition(tmp_path, task)
    folds.main([f"configs/{task}/competition.yaml"])
    train.main([f"configs/{task}/lenet5.yaml"])
    predict.main([f"configs/{task}/lenet5.yaml"])
    ensemble.main([f"configs/{task}/ensemble.yaml"])
    submit.main([f"configs/{task}/ensemble.yaml"])

    scores = json.loads((tmp_path / f"runs/{task}/lenet5/scores.json").read_text())
    metric = scores["metric"]
    gain = scores["cv"] - scores["baseline_cv"]
    margin = MARGIN[metric]
    assert (gain >= margin) if margin > 0 else (gain <= margin), scores
    sub = pd.read_csv(tmp_path / f"submissions/{task}.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(tmp_path / f"data/{task}/sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns) and list(sub["id"]) == list(sample["id"])
    values = sub.iloc[:, 1]
    if task == "multilabel":
        assert set(" ".join(values).split()) <= {"d0", "d1", "d2", "d3"}
    elif task == "ordinal":
        assert values.isin(["0", "1", "2", "3", "4"]).all()
    elif task in ("binary", "regression"):
        assert np.isfinite(values.astype(float)).all()
    weights = json.loads((tmp_path / f"runs/{task}/ensemble/weights.json").read_text())
    assert (weights["thresholds"] is not None) <= (task in ("multilabel", "ordinal"))
    decided = task in ("multilabel", "ordinal")  # their metrics score decisions
    assert (weights["thresholds_choice"] is not None) == decided
    assert all((c["thresholds_choice"] is not None) == decided
               for c in weights["nested_cv"]["folds"].values())


@pytest.mark.parametrize("task", ["multilabel", "ordinal"])
def test_the_package_carries_task_and_thresholds_and_infers_submit_bytes(tmp_path, monkeypatch,
                                                                          task):
    monkeypatch.chdir(tmp_path)
    make_task_competition(tmp_path, task, epochs=4)
    ens = f"configs/{task}/ensemble.yaml"
    folds.main([f"configs/{task}/competition.yaml"])
    train.main([f"configs/{task}/lenet5.yaml"])
    predict.main([f"configs/{task}/lenet5.yaml"])
    ensemble.main([ens])
    submit.main([ens])
    package.main([ens])
    infer.main([f"packages/{task}", "--test-images", f"data/{task}/test", "--sample-submission",
                f"data/{task}/sample_submission.csv", "--out", "infer.csv"])
    meta = json.loads((tmp_path / f"packages/{task}/package.json").read_text())
    weights = json.loads((tmp_path / f"runs/{task}/ensemble/weights.json").read_text())
    assert meta["task_spec"]["kind"] == task and meta["thresholds"] == weights["thresholds"]
    assert (tmp_path / "infer.csv").read_bytes() == \
        (tmp_path / f"submissions/{task}.csv").read_bytes()
