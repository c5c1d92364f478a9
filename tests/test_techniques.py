"""What wins competitions (pipeline.training.teacher, averaging, kfold's refit): pseudo-labels
and distillation learned fold by fold from the source's fold-k models, so the learner's CV stays
honest (the leak canaries); full-data refits; checkpoint averaging; the package carrying refits
and a student; make's chain source -> learner -> ensemble."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import COMPETITION, EXPERIMENT, make_competition, write_yaml
from pipeline import ensemble, folds, infer, package, predict, submit, train
from pipeline.core import dependencies, layout, tasks
from pipeline.core.competition import load_competition_data
from pipeline.core.config import check_folder, load_experiment
from pipeline.core.errors import UserError
from pipeline.models import finetune
from pipeline.models.predictor import load_weights
from pipeline.training import averaging, teacher
from pipeline.training.experiment import prepare
from pipeline.training.kfold import refit_plan

REPO = Path(__file__).resolve().parents[1]
LEARNING = {**EXPERIMENT, "train": {**EXPERIMENT["train"], "epochs": 6}}
BLIND = {**EXPERIMENT, "train": {**LEARNING["train"], "keep": "last"}}  # no epoch chosen on fold k
CONFIGS = {
    "base": BLIND,
    "base2": {**BLIND, "seed": 1},
    "blend": {"competition": "competition.yaml", "experiments": ["base", "base2"], "trials": 3},
    "student": {**BLIND, "seed": 2,
                "train": {**BLIND["train"], "average": {"checkpoints": 2, "of": "last"}},
                "distill": {"teacher": "blend", "alpha": 0.5},
                "pseudo": {"source": "blend", "confidence": 0.4, "rounds": 2}},
    "refitted": {**LEARNING, "seed": 3, "pseudo": {"source": "base", "labels": "hard"},
                 "train": {**LEARNING["train"], "average": {"checkpoints": 2, "of": "best"}},
                 "refit": {"seeds": [0]}},
    "ensemble": {"competition": "competition.yaml", "experiments": ["base", "student", "refitted"],
                 "trials": 3},
}
ORDER = ["base", "base2", "blend", "student", "refitted", "ensemble"]


def build_chain(root: Path) -> None:
    """What `make all` runs after the folds, in make's order (deps.mk): sources first."""
    for name in ORDER:
        config = [f"configs/tiny/{name}.yaml"]
        if "experiments" in CONFIGS[name]:
            ensemble.main(config)
        else:
            train.main(config)
            predict.main(config)
    submit.main(["configs/tiny/ensemble.yaml"])


def new_project(root: Path, scramble_fold: int | None = None) -> Path:
    """The tiny competition (12 test images) with CONFIGS; `scramble_fold`: that fold's labels
    permuted (folds/tiny.csv taken from the unscrambled data, as a fixed fold file)."""
    make_competition(root / "data/tiny", n_test=12)
    write_yaml(root / "configs/tiny/competition.yaml", COMPETITION)
    for name, cfg in CONFIGS.items():
        write_yaml(root / f"configs/tiny/{name}.yaml", cfg)
    folds.main(["configs/tiny/competition.yaml"])
    if scramble_fold is not None:
        table = pd.read_csv(root / "data/tiny/train.csv")
        fold = pd.read_csv(root / "folds/tiny.csv")["fold"].to_numpy()
        rows = np.flatnonzero(fold == scramble_fold)
        targets = table["target"].to_numpy()
        targets[rows] = np.random.default_rng(5).permutation(targets[rows])
        assert (targets[rows] != pd.read_csv(root / "data/tiny/train.csv")["target"]
                .to_numpy()[rows]).any()
        table.assign(target=targets).to_csv(root / "data/tiny/train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """The chain built twice: on the data, and with fold 0's labels scrambled."""
    roots = {}
    for name, scramble in (("plain", None), ("scrambled", 0)):
        root = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            new_project(root, scramble)
            build_chain(root)
            exp = prepare(load_experiment("configs/tiny/student.yaml"))
            targets = {k: teacher.fold_data(exp, k).targets for k in (0, 1)}
            package.main(["configs/tiny/ensemble.yaml"])
        roots[name] = (root, targets)
    return roots


def test_a_folds_pseudo_labels_and_teacher_targets_ignore_that_folds_labels(chains):
    """Leak canary: fold 0's targets (teacher's predictions mixed into the labels of the
    other fold's rows, then the pseudo-labelled test rows) come from models that never saw fold
    0's labels, so scrambling them changes nothing; fold 1's targets move."""
    (_, plain), (_, scrambled) = chains["plain"], chains["scrambled"]
    np.testing.assert_array_equal(plain[0], scrambled[0])
    assert not np.array_equal(plain[1], scrambled[1])
    assert len(plain[0]) > 12 and (plain[0][12:, -1] == 1).all()  # pseudo rows follow


def test_a_students_oof_does_not_depend_on_its_own_folds_labels(chains):
    """Leak canary: the student's fold-0 OOF rows are bytes-identical with fold 0's labels
    scrambled (its teacher's targets were its fold-0 models', and so were its second round's
    pseudo-labels), the other fold's move."""
    (plain, _), (scrambled, _) = chains["plain"], chains["scrambled"]
    run = "runs/tiny/student"
    assert (plain / run / "fold0/oof.csv").read_bytes() == \
        (scrambled / run / "fold0/oof.csv").read_bytes()
    assert (plain / run / "fold1/oof.csv").read_bytes() != \
        (scrambled / run / "fold1/oof.csv").read_bytes()


def test_learners_learn_average_and_refit(chains):
    root, _ = chains["plain"]
    for name in ("student", "refitted"):
        scores = json.loads((root / layout.Run.of("tiny", name).scores).read_text())
        assert scores["cv"] >= scores["baseline_cv"] + 0.3, name  # learnt: prior 1/3
    run = layout.Run.of("tiny", "student")
    for k in (0, 1):  # round 1 kept beside the last round's fold model
        first = root / run.fold(k) / "round1"
        assert (first / layout.BEST).is_file() and not (first / layout.LAST).is_file()
        assert len(pd.read_csv(first / layout.LOG)) == 6
        record = json.loads((root / run.fold(k) / averaging.RECORD).read_text())
        assert record["of"] == "last" and record["epochs"] == [4, 5]  # the log counts from 0
        assert not list((root / run.fold(k)).glob("epoch*.safetensors"))  # averaged, removed
    run = layout.Run.of("tiny", "refitted")
    scores = json.loads((root / run.scores).read_text())
    assert scores["refit"]["note"] == "refit models have no OOF: the CV is the k-fold models'"
    log = pd.read_csv(root / run.log(0))
    record = json.loads((root / run.fold(0) / averaging.RECORD).read_text())
    best_two = log.sort_values(["val_metric", "epoch"], ascending=[False, True])["epoch"][:2]
    assert record["of"] == "best" and record["epochs"] == list(best_two)
    refit = root / run.refit(0)
    log = pd.read_csv(refit / layout.LOG)
    assert (refit / layout.BEST).is_file() and not (refit / layout.LAST).is_file()
    assert log["val_metric"].isna().all() and 1 <= len(log) <= 6
    refit_record = json.loads((refit / averaging.RECORD).read_text())
    assert refit_record["kept"] and refit_record["of"] == "last"


def test_package_carries_the_refit_and_infer_gives_submits_bytes(chains, tmp_path):
    root, _ = chains["plain"]
    settings = json.loads((root / "packages/tiny/refitted/settings.json").read_text())
    assert settings["models"] == ["fold0", "fold1", "refit0"]
    assert (root / "packages/tiny/refitted/refit0.safetensors").is_file()
    student = json.loads((root / "packages/tiny/student/settings.json").read_text())
    assert student["models"] == ["fold0", "fold1"]
    fresh = tmp_path / "fresh"
    shutil.copytree(root / "packages/tiny", fresh / "pkg")
    shutil.copytree(root / "data/tiny/test", fresh / "test")
    shutil.copy(root / "data/tiny/sample_submission.csv", fresh / "sample.csv")
    infer.main([str(fresh / "pkg"), "--test-images", str(fresh / "test"), "--sample-submission",
                str(fresh / "sample.csv"), "--out", str(fresh / "sub.csv")])
    assert (fresh / "sub.csv").read_bytes() == (root / "submissions/tiny.csv").read_bytes()


def test_make_builds_sources_before_learners_and_members_before_ensembles(chains, tmp_path,
                                                                          monkeypatch):
    root, _ = chains["plain"]
    monkeypatch.chdir(root)
    deps = (root / "runs/tiny/deps.mk")
    folds.main(["configs/tiny/competition.yaml", "--deps", str(deps)])
    lines = deps.read_text().splitlines()[1:]
    assert lines == [
        "runs/tiny/blend/weights.json: runs/tiny/base/test.csv runs/tiny/base2/test.csv",
        "runs/tiny/ensemble/weights.json: runs/tiny/base/test.csv runs/tiny/student/test.csv "
        "runs/tiny/refitted/test.csv",
        "runs/tiny/refitted/oof.csv: runs/tiny/base/test.csv",
        "runs/tiny/student/oof.csv: runs/tiny/blend/weights.json"]
    work = tmp_path / "work"
    shutil.copytree(root / "data", work / "data")
    shutil.copytree(root / "configs", work / "configs")
    done = subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "-n",
                           "all", "COMP=tiny", f"PY={sys.executable}"], cwd=work,
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    stages = [f"{line.split()[2].split('.')[-1]} {Path(line.split()[3]).stem}"
              for line in done.stdout.splitlines()
              if " -m pipeline." in line and "--check" not in line and "--deps" not in line]
    assert stages.index("ensemble blend") > max(stages.index("predict base"),
                                                stages.index("predict base2"))
    assert stages.index("train student") > stages.index("ensemble blend")
    assert stages.index("train refitted") > stages.index("predict base")
    assert stages.index("ensemble ensemble") > max(stages.index("predict student"),
                                                   stages.index("predict refitted"))
    assert stages[-1] == "submit ensemble"


def test_pseudo_rows_are_the_sure_share_with_their_weight(tiny):
    """fold_targets: train rows with (smoothed) labels mixed with the teacher by alpha, then
    test rows at or above the confidence, the seeded share of them, soft or hard, weighted."""
    write_yaml(tiny / "configs/tiny/lenet5.yaml",
               {**EXPERIMENT, "train": {**EXPERIMENT["train"], "label_smoothing": 0.3},
                "pseudo": {"source": "x", "confidence": 0.6, "share": 0.5, "weight": 0.25,
                           "labels": "hard"}, "distill": {"teacher": "x", "alpha": 0.5}})
    folds.main(["configs/tiny/competition.yaml"])
    cfg = load_experiment("configs/tiny/lenet5.yaml")
    comp = load_competition_data(cfg)
    rows = np.arange(6)
    test = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.3, 0.3],
                     [0.2, 0.65, 0.15], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
    source = teacher.Predictions(None, pd.DataFrame(test, index=comp.test["id"]))
    taught = np.full((len(comp.train), 3), 1 / 3)
    tutor = teacher.Predictions(pd.DataFrame(taught, index=comp.train["id"]), source.test)
    fake = type("Exp", (), dict(cfg=cfg, comp=comp))
    out_rows, targets = teacher.fold_targets(fake, rows, 0, source, tutor)
    labels = np.eye(3)[comp.y[rows]] * 0.7 + 0.1
    np.testing.assert_allclose(targets[:6, :3], 0.5 * labels + 0.5 / 3, rtol=1e-6)
    assert (targets[:6, 3] == 1).all()
    sure = [0, 1, 3, 5]  # confidence >= 0.6
    picked = out_rows[6:] - len(comp.train)
    assert len(picked) == 2 and set(picked) <= set(sure)
    np.testing.assert_array_equal(targets[6:, :3], np.eye(3)[test[picked].argmax(1)])
    assert (targets[6:, 3] == 0.25).all()
    again = teacher.fold_targets(fake, rows, 0, source, tutor)
    np.testing.assert_array_equal(again[0], out_rows)  # seeded by (seed, fold)


def test_refit_stages_stop_at_the_median_best_epoch():
    plan = [finetune.Stage(2, 1), finetune.Stage(4, 3)]
    assert refit_plan(plan, [0, 1, 1]) == [finetune.Stage(2, 1)]  # best epochs 1, 2, 2
    assert refit_plan(plan, [3, 4, 5]) == [finetune.Stage(2, 1), finetune.Stage(3, 3)]
    assert refit_plan(plan, [9, 9]) == plan


def test_averaging_candidates_and_mean():
    log = [dict(epoch=e, val_metric=v) for e, v in zip(range(1, 6), [0.5, 0.9, 0.7, 0.9, 0.6])]
    assert averaging.candidates(log, 3, "last", "accuracy") == [3, 4, 5]
    assert averaging.candidates(log, 3, "best", "accuracy") == [2, 4, 3]  # earlier among equals
    assert averaging.candidates(log, 2, "greedy", "log_loss") == [1, 5]
    states = [{"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)},
              {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}]
    mean = averaging.mean_state(states)
    torch.testing.assert_close(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["n"].item() == 4


def test_averaged_batchnorm_statistics_are_recomputed_on_the_folds_images(tiny):
    """A BatchNorm model averaged: its running statistics are the plain mean over the fold's
    training images (momentum None), not an average of the epochs' statistics."""
    write_yaml(tiny / "configs/tiny/lenet5.yaml",
               {**EXPERIMENT, "model": {"backbone": "resnet10t"},
                "train": {**EXPERIMENT["train"], "epochs": 3,
                          "average": {"checkpoints": 3, "of": "greedy"}}})
    folds.main(["configs/tiny/competition.yaml"])
    train.main(["configs/tiny/lenet5.yaml"])
    exp = prepare(load_experiment("configs/tiny/lenet5.yaml"))
    record = json.loads((exp.run.fold(0) / averaging.RECORD).read_text())
    log = [dict(epoch=int(r.epoch), val_metric=r.val_metric)
           for r in pd.read_csv(exp.run.log(0)).itertuples()]
    ranked = averaging.candidates(log, 3, "best", "accuracy")
    assert record["of"] == "greedy" and record["epochs"][0] == ranked[0]
    assert set(record["epochs"]) <= set(ranked)
    state = load_weights(exp.run.best(0))
    means = [k for k in state if k.endswith("running_mean")]
    counts = {int(state[k.replace("running_mean", "num_batches_tracked")]) for k in means}
    # kept: BatchNorm recomputed over the 12 training images, one evaluation batch; else the
    # best epoch's statistics, tracked over its training steps
    assert means and (counts == {1} if record["kept"] else min(counts) > 1)


def test_a_learners_sources_are_checked_with_the_folder(tiny):
    write_yaml(tiny / "configs/tiny/student.yaml", {**EXPERIMENT, "pseudo": {"source": "nope"}})
    with pytest.raises(UserError, match=r"student.yaml: pseudo.source: 'nope' is not a config"):
        check_folder("configs/tiny/competition.yaml")
    write_yaml(tiny / "configs/tiny/student.yaml", {**EXPERIMENT, "distill": {"teacher": "blend"}})
    write_yaml(tiny / "configs/tiny/blend.yaml", {"competition": "competition.yaml",
                                                  "experiments": ["lenet5", "student"]})
    configs = check_folder("configs/tiny/competition.yaml")
    with pytest.raises(UserError, match=r"blend.yaml: needs its own results: "
                                        r"blend -> student -> blend"):
        dependencies.check_acyclic(configs, Path("configs/tiny"))
    write_yaml(tiny / "configs/tiny/student.yaml",
               {**EXPERIMENT, "distill": {"teacher": "lenet5"}, "refit": {}})
    with pytest.raises(UserError, match=r"student.yaml: refit: .*a student \(distill\) has no "
                                        r"refit"):
        check_folder("configs/tiny/competition.yaml")


def test_refit_replace_predicts_the_test_set_with_the_refits_only(tiny):
    write_yaml(tiny / "configs/tiny/lenet5.yaml",
               {**EXPERIMENT, "refit": {"seeds": [0, 3], "use": "replace"}})
    folds.main(["configs/tiny/competition.yaml"])
    exp = prepare(load_experiment("configs/tiny/lenet5.yaml"))
    assert list(exp.test_checkpoints()) == ["refit0", "refit3"]
    joined = exp.cfg.model_copy(update={"refit": exp.cfg.refit.model_copy(update={"use": "join"})})
    assert list(prepare(joined).test_checkpoints()) == ["fold0", "fold1", "refit0", "refit3"]


def test_ordinal_hard_pseudo_labels_are_grades():
    task = tasks.Ordinal(("g",), 0.0, 4.0, "mse", (0.0, 1.0, 2.0, 4.0))
    np.testing.assert_array_equal(task.harden(np.array([[0.2], [1.6], [3.1]])),
                                  [[0.0], [2.0], [4.0]])
