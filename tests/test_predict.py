"""The predict stage on a tiny trained experiment: same views for OOF and test, auto choice, refusals."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from conftest import COMPETITION, EXPERIMENT, make_competition, write_yaml
from pipeline import folds, train
from pipeline.core import metrics, tasks
from pipeline.training.experiment import prepare
from pipeline.training.prediction import (candidate_view_sets, choose_view_set,
                                           distinct_view_sets, predict_experiment)
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


def _views_case(seed=0):
    """Folds of 20, 20 and 80 rows and two view sets: `a` predicts folds 0 and 1 right and
    fold 2 wrong, `b` the reverse, so `b` wins on all rows but `a` on folds 0 and 1."""
    rng = np.random.default_rng(seed)
    task = tasks.Multiclass(("x", "y"))
    folds = np.repeat([0, 1, 2], [20, 20, 80])
    y = rng.integers(0, 2, 120)
    good, bad = np.eye(2)[y] * 0.8 + 0.1, np.eye(2)[1 - y] * 0.8 + 0.1
    a = np.where((folds < 2)[:, None], good, bad)
    b = np.where((folds == 2)[:, None], good, bad)
    return task, y, folds, {"a": a, "b": b}


def test_auto_view_choice_is_made_under_nested_cv():
    task, y, folds, oof = _views_case()
    choice = choose_view_set("accuracy", task, y, folds, oof)
    assert choice.chosen == "b" and choice.in_sample == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert choice.per_fold == {0: "b", 1: "b", 2: "a"}  # each chosen without its own rows
    nested = metrics.cv("accuracy", task, y, folds, choice.oof)
    assert nested.headline == 0.0  # every fold got the view set that fails it: honest, not 2/3


def test_a_folds_view_choice_does_not_move_when_its_labels_are_scrambled():
    """Leak canary: the view set chosen for fold 2 is chosen without fold 2's labels."""
    task, y, folds, oof = _views_case()
    scrambled = y.copy()
    scrambled[folds == 2] = 1 - scrambled[folds == 2]  # on all rows `a` now wins
    before = choose_view_set("accuracy", task, y, folds, oof)
    after = choose_view_set("accuracy", task, scrambled, folds, oof)
    assert after.chosen != before.chosen and after.per_fold[2] == before.per_fold[2] == "a"
    np.testing.assert_array_equal(after.oof[folds == 2], before.oof[folds == 2])


def test_a_rank_metrics_cv_is_the_mean_over_folds_and_both_figures_are_kept():
    """Two folds ranked perfectly, each on its own scale: pooling them understates AUC."""
    task = tasks.Binary(("no", "yes"))
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    cv = metrics.cv("roc_auc", task, y, folds, np.c_[1 - p, p])
    assert cv.basis == "mean over folds" and cv.headline == cv.fold_mean == 1.0
    assert cv.pooled == pytest.approx(0.75) and "pooled OOF 0.75000" in cv.text()
    acc = metrics.cv("accuracy", task, y, folds, np.c_[1 - p, p])
    assert acc.basis == "pooled OOF" and acc.headline == acc.pooled


def test_view_sets_that_equal_a_cheaper_one_at_this_crop_are_left_out():
    """At crop_pct 1 every crop is the whole image: five_crop is no TTA, ten_crop is hflip."""
    kept, same = distinct_view_sets(["none", "hflip", "five_crop", "ten_crop", "dihedral8"], 16, 16)
    assert kept == ["none", "hflip", "dihedral8"] and same == {"five_crop": "none",
                                                               "ten_crop": "hflip"}
    assert distinct_view_sets(["none", "five_crop", "ten_crop"], 19, 16)[1] == {}  # crops differ


def test_an_asked_view_set_that_equals_a_cheaper_one_says_so(tiny, capsys):
    from conftest import EXPERIMENT, write_yaml
    write_yaml(tiny / "configs/tiny/flat.yaml", {**EXPERIMENT, "model": {"backbone": "lenet5",
                                                                         "crop_pct": 1.0},
                                                 "tta": {"views": "ten_crop"}})
    cfg = load_experiment("configs/tiny/flat.yaml")
    assert candidate_view_sets(cfg, cfg.image_size) == ["hflip"]
    assert capsys.readouterr().err.strip() == (
        "note: flat: tta view set ten_crop equals hflip here (crops of 16 px from 16 px images); "
        "predicting hflip instead")


def test_multiscale_views_are_predicted_and_merged_through_the_one_path(trained, monkeypatch):
    """tta.views: multiscale on the 19 px cache: each OOF row is the mean over the centre crop
    and its two zooms (14 and 18 px resized to 16) of its fold model's probabilities."""
    import torch
    from pipeline.data.loader import normalize
    from pipeline.models import tta
    cfg, scores = run(trained, monkeypatch, "tta.views=multiscale", "tta.max_batch=7")
    assert scores["tta_views"] == "multiscale"
    s = prepare(cfg)
    rows = np.flatnonzero(s.folds == 0)
    x = torch.from_numpy(s.images[rows]).permute(0, 3, 1, 2)
    model = s.fold_model(0).module
    with torch.inference_mode():
        want = np.mean([torch.softmax(model(normalize(tta.apply_view(x, 16, v), s.spec)), 1)
                        .numpy() for v in tta.VIEW_SETS["multiscale"]], axis=0)
    np.testing.assert_allclose(read(trained, "oof_tta.csv")[CLASSES].to_numpy()[rows], want,
                               atol=1e-6)
    assert not np.allclose(want, read(trained, "oof.csv")[CLASSES].to_numpy()[rows], atol=1e-4)
