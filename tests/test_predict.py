"""The predict stage on a tiny trained experiment: same views for OOF and test, auto choice, refusals."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from conftest import COMPETITION, EXPERIMENT, make_competition, write_yaml
from pipeline import folds, train
from pipeline.core import metrics
from pipeline.training.experiment import prepare
from pipeline.training.prediction import predict_experiment
from pipeline.core.config import load_experiment
from pipeline.core.errors import UserError
from pipeline.data.images import image_cache
from pipeline.models.factory import cache_size

EXP = "configs/tiny/lenet5.yaml"
CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny competition with lenet5 trained on 2 folds; crop_pct 0.85 gives a 19 px cache."""
    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        make_competition(root / "data/tiny")
        write_yaml(root / "configs/tiny/competition.yaml", COMPETITION)
        write_yaml(root / EXP, {**EXPERIMENT, "model": {"backbone": "lenet5", "crop_pct": 0.85}})
        folds.main(["configs/tiny/competition.yaml"])
        train.main([EXP])
        yield root


def run(root, monkeypatch, *overrides):
    monkeypatch.chdir(root)
    cfg = load_experiment(EXP, list(overrides))
    return cfg, predict_experiment(cfg)


def read(root, name):
    return pd.read_csv(root / "runs/tiny/lenet5" / name, dtype={"id": str})


def test_view_none_equals_the_train_stage_oof(trained, monkeypatch):
    _, scores = run(trained, monkeypatch, "tta.views=none")
    plain, tta = read(trained, "oof.csv"), read(trained, "oof_tta.csv")
    assert list(tta.columns) == ["id", "fold", *CLASSES]
    assert tta["id"].tolist() == plain["id"].tolist() and tta["fold"].equals(plain["fold"])
    np.testing.assert_allclose(tta[CLASSES], plain[CLASSES], atol=1e-6)
    assert scores["cv_tta"] == scores["cv"] and scores["tta_views"] == "none"


def test_test_csv_is_every_fold_model_on_every_test_row_averaged(trained, monkeypatch):
    cfg, _ = run(trained, monkeypatch, "tta.views=none")
    s = prepare(cfg)
    images = image_cache(list(s.comp.test["path"]), cache_size(cfg.image_size, s.spec.crop_pct),
                         3, cfg.data.cache_dir)
    on_test = dataclasses.replace(s, images=images)  # the train stage's centre-crop prediction
    per_fold = [on_test.predict_plain(s.fold_model(k), np.arange(len(images))) for k in range(2)]
    test = read(trained, "test.csv")
    sample = pd.read_csv(trained / "data/tiny/sample_submission.csv")
    assert list(test.columns) == ["id", *CLASSES]
    assert test["id"].tolist() == sample["image_id"].tolist()
    np.testing.assert_allclose(test[CLASSES], np.mean(per_fold, axis=0), atol=1e-6)


def test_auto_keeps_the_best_view_set_and_records_all_scores(trained, monkeypatch):
    cfg, scores = run(trained, monkeypatch, "tta.views=auto", "tta.merge=geometric")
    assert list(scores["tta_scores"]) == cfg.tta.candidates
    best = metrics.best_key("accuracy", scores["tta_scores"])
    assert scores["tta_views"] == best and scores["tta_merge"] == "geometric"
    assert scores["cv_tta"] == scores["tta_scores"][best]
    on_disk = json.loads((trained / "runs/tiny/lenet5/scores.json").read_text())
    assert on_disk["cv"] == scores["cv"] and set(on_disk["per_fold_tta"]) == {"0", "1"}
    oof = read(trained, "oof_tta.csv")
    comp = prepare(cfg).comp
    assert metrics.score("accuracy", comp.task, comp.y, oof[CLASSES].to_numpy()) == \
        pytest.approx(scores["cv_tta"])
    auto_test = read(trained, "test.csv")
    run(trained, monkeypatch, f"tta.views={best}", "tta.merge=geometric", "tta.max_batch=5")
    np.testing.assert_allclose(read(trained, "oof_tta.csv")[CLASSES], oof[CLASSES], atol=1e-6)
    np.testing.assert_allclose(read(trained, "test.csv")[CLASSES], auto_test[CLASSES], atol=1e-6)


def test_outputs_are_deterministic(trained, monkeypatch):
    run(trained, monkeypatch, "tta.views=ten_crop")
    first = [(trained / "runs/tiny/lenet5" / f).read_bytes() for f in ("oof_tta.csv", "test.csv")]
    run(trained, monkeypatch, "tta.views=ten_crop")
    second = [(trained / "runs/tiny/lenet5" / f).read_bytes() for f in ("oof_tta.csv", "test.csv")]
    assert first == second


def test_best_view_set_prefers_the_first_listed_on_ties():
    assert metrics.best_key("accuracy", {"none": 0.9, "hflip": 0.9, "ten_crop": 0.8}) == "none"
    assert metrics.best_key("log_loss", {"none": 0.3, "hflip": 0.2}) == "hflip"


def test_refuses_a_run_trained_with_another_config(trained, monkeypatch):
    with pytest.raises(UserError, match=r"runs/tiny/lenet5: trained with .*retrain it"):
        run(trained, monkeypatch, "train.epochs=3")
    with pytest.raises(UserError, match=r"runs/tiny/other/scores.json: not found"):
        run(trained, monkeypatch, "experiment=other")


def test_refuses_a_missing_fold_checkpoint(trained, monkeypatch):
    ckpt = trained / "runs/tiny/lenet5/fold1/best.safetensors"
    moved = ckpt.with_suffix(".moved")
    ckpt.rename(moved)
    try:
        with pytest.raises(UserError, match=r"fold1/best.safetensors: not found"):
            run(trained, monkeypatch)
    finally:
        moved.rename(ckpt)
