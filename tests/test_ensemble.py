"""The ensemble stage on toy run folders written directly (no training)."""
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from conftest import write_yaml
from pipeline import ensemble
from pipeline.blending import blend, stack
from pipeline.blending.choose import Rows, choose, nested
from pipeline.blending.run import run_ensemble
from pipeline.core import metrics, tasks
from pipeline.core.artifacts import as_written
from pipeline.core.config import load_ensemble
from pipeline.core.errors import UserError

CLASSES = ["class_0", "class_1", "class_2"]
TRAIN_IDS = [f"tr{c}{j:03d}" for c in range(3) for j in range(8)]  # conftest's tiny competition
Y = np.repeat(np.arange(3), 8)
FOLDS = np.tile(np.arange(8) % 2, 3)
TEST_IDS = [f"te{i:03d}" for i in reversed(range(6))]  # sample_submission's order
TASK = tasks.Multiclass(tuple(CLASSES))


def toy_proba(n, signal, seed, y=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, 3)) + (signal * np.eye(3)[y] if y is not None else 0)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def write_run(exp, signal, seed, fold_hash="f00d", oof_ids=TRAIN_IDS, classes=CLASSES,
              permute=None):
    """runs/tiny/<exp>/{oof_tta.csv, test.csv, scores.json} as the predict stage writes them."""
    run = Path("runs/tiny") / exp
    run.mkdir(parents=True, exist_ok=True)
    oof = pd.DataFrame(toy_proba(24, signal, seed, Y), columns=classes)
    oof.insert(0, "fold", FOLDS)
    oof.insert(0, "id", TRAIN_IDS)
    oof = oof[oof["id"].isin(oof_ids)]
    test = pd.DataFrame(toy_proba(6, signal, seed + 100, np.arange(6) % 3), columns=classes)
    test.insert(0, "id", TEST_IDS)
    if permute is not None:
        oof, test = oof.iloc[permute(len(oof))], test.iloc[permute(len(test))]
    oof.to_csv(run / "oof_tta.csv", index=False)
    test.to_csv(run / "test.csv", index=False)
    (run / "scores.json").write_text(json.dumps({"tag": f"cfg{seed}-{fold_hash}", "cv": 0.5}))


def config(tiny, experiments, **keys):
    write_yaml(tiny / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": experiments, "trials": 15, **keys})
    return load_ensemble(tiny / "configs/tiny/ensemble.yaml")


def outputs(tiny):
    run = tiny / "runs/tiny/ensemble"
    return {f: (run / f).read_bytes() for f in ("weights.json", "test.csv", "report.md")}


def test_ensemble_writes_weights_blend_report_plots_and_study(tiny):
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    write_run("noise", 0.0, 3)
    result = run_ensemble(config(tiny, ["good", "weak", "noise"], mode="tune", metric="log_loss"))
    run = tiny / "runs/tiny/ensemble"

    saved = json.loads((run / "weights.json").read_text())
    w = np.array([saved["weights"][e] for e in saved["experiments"]])
    assert saved["experiments"] == ["good", "weak", "noise"] and len(saved["weights"]) == 3
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert saved["mode"] in blend.MODES and saved["best_single"] == "good"
    assert sorted(saved["nested_cv"]["folds"]) == ["0", "1"]
    assert saved["cv"] == pytest.approx(result["cv"]) == pytest.approx(saved["nested_cv"]["cv"])

    test = pd.read_csv(run / "test.csv")
    assert list(test.columns) == ["id", *CLASSES] and list(test["id"]) == TEST_IDS
    np.testing.assert_allclose(test[CLASSES].sum(1), 1.0, atol=1e-6)

    report = (run / "report.md").read_text()
    for row in ("| submitted, nested CV |", "| submitted, in sample |", "| equal weights |",
                "| best single (good) |", "| without fold 1 |", "history.png", "folds.png"):
        assert row in report
    for png in ("history.png", "folds.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    study = optuna.load_study(study_name="tiny-ensemble", storage=f"sqlite:///{run / 'study.db'}")
    assert len(study.trials) == 15 and study.direction.name == "MINIMIZE"
    assert {t.params["mode"] for t in study.trials} <= set(blend.MODES)
    assert study.best_trial.value == pytest.approx(saved["tuned_in_sample_cv"])
    assert not list(run.glob(".*"))  # no temporary files left behind


def test_rerun_gives_byte_identical_artifacts(tiny):
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    config(tiny, ["good", "weak"])
    ensemble.main(["configs/tiny/ensemble.yaml"])
    first = outputs(tiny)
    ensemble.main(["configs/tiny/ensemble.yaml"])
    assert outputs(tiny) == first


def test_a_stack_is_written_with_its_meta_model_and_applied_to_the_test_rows(tiny):
    """mode: stack: weights.json holds the meta-model (coefficients, intercepts, strength) that
    the blended test.csv applies, each fold's meta-model under nested CV, and the members'
    coefficient shares as their weights; a rerun writes the same bytes."""
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    config(tiny, ["good", "weak"], mode="stack", metric="log_loss", fallback_to_equal=False)
    ensemble.main(["configs/tiny/ensemble.yaml"])
    first = outputs(tiny)
    saved = json.loads(first["weights.json"])
    meta = stack.from_json(saved["stack"])
    assert saved["mode"] == "stack" and saved["weights_choice"] == "stacked"
    assert meta.model == "multinomial" and meta.coef.shape == (1, 3, 2, 3)
    assert meta.strength in stack.STRENGTHS
    assert set(saved["stack_cv"]) == {"100", "10", "1", "0.1", "0.01"}
    assert sum(saved["weights"].values()) == pytest.approx(1.0)
    for fold in saved["nested_cv"]["folds"].values():  # what a learner's fold applies
        assert stack.from_json(fold["stack"]).coef.shape == (1, 3, 2, 3)
    members = np.stack([pd.read_csv(f"runs/tiny/{e}/test.csv").set_index("id")
                        .loc[TEST_IDS, CLASSES].to_numpy() for e in ("good", "weak")])
    test = pd.read_csv(tiny / "runs/tiny/ensemble/test.csv")
    np.testing.assert_array_equal(test[CLASSES].to_numpy(),
                                  as_written(stack.predict(meta, members, TASK)))
    report = first["report.md"].decode()
    assert "a stacked multinomial meta-model, strength" in report and "mode `stack`" in report
    assert "history.png" not in report and not (tiny / "runs/tiny/ensemble/history.png").exists()
    ensemble.main(["configs/tiny/ensemble.yaml"])
    assert outputs(tiny) == first


def test_rows_in_another_order_are_aligned_by_id(tiny):
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    cfg = config(tiny, ["good", "weak"])
    run_ensemble(cfg)
    first = outputs(tiny)
    write_run("weak", 0.5, 2, permute=lambda n: np.random.default_rng(0).permutation(n))
    run_ensemble(cfg)
    assert outputs(tiny) == first


@pytest.mark.parametrize("change, message", [
    (dict(fold_hash="beef"), "experiments 'good' and 'other' were trained on different fold files"),
    (dict(oof_ids=TRAIN_IDS[1:]), "experiments 'good' and 'other' have different oof ids "
                                  r"\(1 ids in only one of them, e.g. 'tr0000'\)"),
    (dict(classes=["class_1", "class_0", "class_2"]),
     "experiments 'good' and 'other' have different oof class columns or order"),
])
def test_refuses_experiments_that_cannot_be_blended(tiny, change, message):
    write_run("good", 2.0, 1)
    write_run("other", 0.5, 2, **change)
    with pytest.raises(UserError, match=message):
        run_ensemble(config(tiny, ["good", "other"]))


def test_refuses_a_missing_experiment_and_a_duplicate(tiny, capsys):
    write_run("good", 2.0, 1)
    config(tiny, ["good", "absent"])
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(["configs/tiny/ensemble.yaml"])
    assert exit_info.value.code == 2
    assert "runs/tiny/absent/oof_tta.csv: not found" in capsys.readouterr().err
    with pytest.raises(UserError, match="names an experiment twice"):
        run_ensemble(config(tiny, ["good", "good"]))


def test_falls_back_to_equal_weights_when_tuning_does_not_beat_them(tiny, capsys):
    write_run("good", 2.0, 1)
    write_run("twin", 2.0, 1)  # identical predictions: no weighting can beat equal weights
    result = run_ensemble(config(tiny, ["good", "twin"]))
    assert result["weights_choice"] == "equal" and result["weights"] == {"good": 0.5, "twin": 0.5}
    assert "tuned weights do not beat equal weights under CV" in capsys.readouterr().err
    kept = run_ensemble(config(tiny, ["good", "twin"], fallback_to_equal=False))
    assert kept["weights_choice"] == "tuned" and kept["decision"] == "nothing was tuned"


def test_shared_storage_keeps_the_study_and_refuses_another_setup(tiny):
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    url = f"sqlite:///{tiny / 'shared.db'}"
    run_ensemble(config(tiny, ["good", "weak"], storage=url))
    run_ensemble(config(tiny, ["good", "weak"], storage=url))  # a finished study: no new trials
    study = optuna.load_study(study_name="tiny-ensemble", storage=url)
    assert len(study.trials) == 15 and study.user_attrs["experiments"] == ["good", "weak"]
    assert not (tiny / "runs/tiny/ensemble/study.db").exists()
    with pytest.raises(UserError, match="storage: study 'tiny-ensemble' .* was tuned for"):
        run_ensemble(config(tiny, ["weak", "good"], storage=url))
    with pytest.raises(UserError, match="storage: optuna cannot open 'nonsense'"):
        run_ensemble(config(tiny, ["good", "weak"], storage="nonsense"))


def test_headline_quotes_the_nested_cv_score_of_what_is_submitted():
    from pipeline.reports.ensemble import headline
    result = dict(metric="accuracy", weights_choice="tuned", weights={"a": 0.7, "b": 0.3},
                  mode="mean", thresholds_choice=None, cv=0.91, cv_basis="nested CV, pooled OOF",
                  in_sample_cv=0.95, nested_cv={"cv": 0.91})
    assert headline(result) == ("nested CV, pooled OOF accuracy 0.91000 with tuned weights "
                                "a=0.700, b=0.300, mode mean (in-sample 0.95000, optimistic)")
    off = {**result, "nested_cv": None, "cv": 0.95}
    assert headline(off).startswith("in-sample OOF accuracy 0.95000")


def test_the_printed_headline_leads_with_nested_cv(tiny, capsys):
    write_run("good", 2.0, 1)
    write_run("weak", 0.5, 2)
    result = run_ensemble(config(tiny, ["good", "weak"], fallback_to_equal=False))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert result["weights_choice"] == "tuned"
    assert last.startswith(f"ensemble: nested CV, pooled OOF accuracy {result['cv']:.5f} with tuned")


def _rows(seed=0, n=240, k=4):
    """Three members of different skill on a binary task, four folds; the blend's positive
    probability is miscalibrated so that tuned thresholds pay."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    members = []
    for skill in (2.0, 1.0, 0.0):
        p = 1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(0, 1, n) - 1.5)))
        members.append(np.c_[1 - p, p])
    return Rows(np.stack(members), y, np.arange(n) % k, tasks.Binary(("neg", "pos")))


def test_weights_mode_and_thresholds_are_chosen_inside_the_nested_loop(tiny):
    """The headline is the nested score of exactly what is submitted: each fold's rows blended and
    decided by the choice made on the other folds (weights, mode and thresholds)."""
    cfg = config(tiny, ["a", "b", "c"], mode="tune", trials=10)
    rows = _rows()
    honest = nested(cfg, rows)
    for f, c in honest.choices.items():
        held = rows.folds == f
        again = choose(cfg, rows.where(~held), cfg.seed + 1000 * (f + 1))
        np.testing.assert_array_equal(again.weights, c.weights)
        np.testing.assert_array_equal(honest.predictions[held], c.predictions(rows.where(held)))
    assert honest.cv.pooled == metrics.score("accuracy", rows.task, rows.y, honest.predictions)
    assert any(c.thresholds is not None for c in honest.choices.values())  # thresholds tuned


def test_a_folds_blend_and_thresholds_do_not_move_when_its_labels_are_scrambled(tiny):
    """Leak canary: scrambling fold 2's labels leaves the weights, mode and thresholds chosen for
    fold 2 unchanged (every other fold's choice sees them, and may move)."""
    cfg = config(tiny, ["a", "b", "c"], mode="tune", trials=10)
    rows = _rows()
    y = rows.y.copy()
    y[rows.folds == 2] = np.random.default_rng(1).permutation(y[rows.folds == 2])
    before, after = nested(cfg, rows), nested(cfg, Rows(rows.oof, y, rows.folds, rows.task))
    a, b = before.choices[2], after.choices[2]
    np.testing.assert_array_equal(a.weights, b.weights)
    assert (a.mode, a.thresholds_choice, a.thresholds) == (b.mode, b.thresholds_choice, b.thresholds)


def test_nested_cv_drives_the_weight_of_a_pure_noise_model_to_zero(tiny):
    cfg = config(tiny, ["a", "b", "noise"], metric="log_loss", trials=40)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    good = [toy_proba(600, 2.0, s, y) for s in (1, 2)]
    rows = Rows(np.stack(good + [rng.dirichlet(np.ones(3), 600)]), y, np.arange(600) % 3,
                tasks.Multiclass(tuple(CLASSES)))
    honest = nested(cfg, rows)
    for c in honest.choices.values():
        assert c.weights[2] < 0.02 and c.weights.sum() == pytest.approx(1.0)
    equal = metrics.score("log_loss", rows.task, y, blend.blend(rows.oof, np.ones(3) / 3, "mean",
                                                                  rows.task))
    assert honest.cv.headline < equal
