"""Training loop: resume gives the same result as an uninterrupted run; checkpoint and log formats."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import COMPETITION, EXPERIMENT, write_yaml
from pipeline import folds, train
from pipeline.core import layout
from pipeline.training import loop
from pipeline.training.experiment import prepare
from pipeline.training.kfold import train_experiment
from pipeline.core.config import load_experiment
from pipeline.core.errors import UserError

STAGED = {
    "finetune": {"stages": [{"epochs": 1, "train": "head"}, {"epochs": 2, "train": "all"}]},
    "train": {"batch_size": 4, "lr": 0.003, "ema_decay": 0.9, "label_smoothing": 0.1},
    "augment": {"preset": "medium", "mixup_alpha": 0.2},
}


def setup(tiny, **experiment):
    write_yaml(tiny / "configs/tiny/exp.yaml", {**EXPERIMENT, **experiment})
    folds.main(["configs/tiny/competition.yaml"])
    return prepare(load_experiment("configs/tiny/exp.yaml"))


def state_after(fold_dir):
    return torch.load(fold_dir / "last.pt", weights_only=True)["state"]


TIMING = ["seconds", "images_per_s", "peak_mem_mb"]  # measured, so they differ run to run


def test_resume_after_an_interruption_gives_the_same_oof_as_an_uninterrupted_run(tiny, monkeypatch):
    s = setup(tiny, **STAGED)
    epochs_run = []
    real_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: epochs_run.append(1) or real_epoch(*a, **k))
    loop.train_fold(s, 0, tiny / "straight")
    interrupted = tiny / "interrupted"
    loop.train_fold(s, 0, interrupted, stop_after_epochs=1)
    assert (state_after(interrupted)["stage"], state_after(interrupted)["epoch"]) == (1, 0)
    loop.train_fold(s, 0, interrupted, stop_after_epochs=1)  # stops in the middle of stage 1
    assert (state_after(interrupted)["stage"], state_after(interrupted)["epoch"]) == (1, 1)
    epochs_run.clear()
    loop.train_fold(s, 0, interrupted)
    assert state_after(interrupted)["stage"] == 2 and len(epochs_run) == 1  # only the last epoch

    a = s.fold_oof(0, tiny / "straight/best.safetensors")
    b = s.fold_oof(0, interrupted / "best.safetensors")
    assert a.equals(b)
    assert (tiny / "straight/best.safetensors").read_bytes() == (interrupted / "best.safetensors").read_bytes()
    logs = [pd.read_csv(d / "log.csv").drop(columns=TIMING) for d in (tiny / "straight", interrupted)]
    assert logs[0].equals(logs[1]) and len(logs[0]) == 3


def test_log_and_checkpoints_have_the_documented_columns(tiny):
    s = setup(tiny, train={"epochs": 2, "batch_size": 4, "lr": 0.003})
    loop.train_fold(s, 1, tiny / "fold1")
    log = pd.read_csv(tiny / "fold1/log.csv")
    assert list(log.columns) == ["epoch", "stage", "stage_epoch", "trainable_groups", "train_loss",
                                 "val_loss", "val_metric", "lr_group0", "lr_group1", "lr_group2",
                                 "lr_group3", *TIMING]
    assert list(log["epoch"]) == [0, 1] and log["val_metric"].between(0, 1).all()
    ckpt = torch.load(tiny / "fold1/last.pt", weights_only=True)
    assert ckpt["tag"] == s.tag and ckpt["state"]["step"] == 2 * 3
    best = s.fold_model(1, tiny / "fold1/best.safetensors")
    assert set(best.module.state_dict()) == set(ckpt["model"]) and best.task == s.comp.task.fit(
        s.comp.y[s.folds != 1])


def test_checkpoint_from_another_config_is_not_resumed(tiny):
    s = setup(tiny, train={"epochs": 1, "batch_size": 4})
    loop.train_fold(s, 0, tiny / "fold0")
    ckpt = torch.load(tiny / "fold0/last.pt", weights_only=True)
    torch.save({**ckpt, "tag": "another"}, tiny / "fold0/last.pt")
    loop.train_fold(s, 0, tiny / "fold0")
    assert len(pd.read_csv(tiny / "fold0/log.csv")) == 1  # trained afresh, not appended


def test_patience_ends_the_stage_early(tiny):
    s = setup(tiny, train={"epochs": 6, "batch_size": 4, "lr": 1e-9, "patience": 1})
    loop.train_fold(s, 0, tiny / "fold0")
    assert len(pd.read_csv(tiny / "fold0/log.csv")) == 2  # no gain at a vanishing rate


def test_stage_errors_stop_the_run_before_any_work(tiny):
    write_yaml(tiny / "configs/tiny/exp.yaml",
               {**EXPERIMENT, "finetune": {"stages": [{"epochs": 1, "train": 0}]}})
    folds.main(["configs/tiny/competition.yaml"])
    with pytest.raises(UserError, match=r"finetune\.stages\[0\]\.train: 0 groups"):
        train_experiment(load_experiment("configs/tiny/exp.yaml"))
    assert not (tiny / "runs").exists() and not list((tiny / "cache").glob("*.npy"))


def test_fold_option_trains_only_those_folds_and_the_oof_waits_for_all(tiny, capsys):
    setup(tiny, train={"epochs": 1, "batch_size": 4, "lr": 0.003})
    run_dir = layout.Run.of("tiny", "exp").dir
    train.main(["configs/tiny/exp.yaml", "--fold", "1"])
    assert (run_dir / "fold1/oof.csv").is_file() and not (run_dir / "fold0").exists()
    assert not (run_dir / "oof.csv").exists() and not (run_dir / "scores.json").exists()
    assert "folds 0 still to train" in capsys.readouterr().err
    train.main(["configs/tiny/exp.yaml", "--fold", "0"])
    oof = pd.read_csv(run_dir / "oof.csv")
    assert sorted(oof["fold"].unique()) == [0, 1] and (run_dir / "scores.json").is_file()


def test_fold_outside_the_split_is_a_one_line_error(tiny, capsys):
    setup(tiny)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["configs/tiny/exp.yaml", "--fold", "2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --fold 2: the folds are 0 to 1 (folds.n_splits)"


def test_a_fold_missing_a_class_is_scored_over_the_classes_present(tiny, capsys):
    """ROC-AUC on a fold without class_2: the mean one-vs-rest AUC of the classes present (a
    note says so), so every fold keeps a best checkpoint and the OOF is complete."""
    write_yaml(tiny / "configs/tiny/competition.yaml", {**COMPETITION, "metric": "roc_auc"})
    setup(tiny, train={"epochs": 2, "batch_size": 4, "lr": 0.003})
    table = pd.read_csv(tiny / "folds/tiny.csv", dtype={"id": str})
    table["fold"] = [0 if i.startswith("tr2") else int(i[-1]) % 2 for i in table["id"]]
    table.to_csv(tiny / "folds/tiny.csv", index=False)
    scores = train_experiment(load_experiment("configs/tiny/exp.yaml"))
    assert "classes absent from the scored rows" in capsys.readouterr().err
    assert all(np.isfinite(v) for v in scores["per_fold"].values())
    assert (tiny / "runs/tiny/exp/fold1/best.safetensors").is_file()


def test_a_fold_holding_one_class_is_refused_before_training(tiny):
    write_yaml(tiny / "configs/tiny/competition.yaml", {**COMPETITION, "metric": "roc_auc"})
    setup(tiny)
    table = pd.read_csv(tiny / "folds/tiny.csv", dtype={"id": str})
    table["fold"] = [0 if i.startswith("tr0") else 1 for i in table["id"]]
    table.to_csv(tiny / "folds/tiny.csv", index=False)
    with pytest.raises(UserError, match="fold 0 holds only class 'class_0': roc_auc is undefined"):
        train_experiment(load_experiment("configs/tiny/exp.yaml"))
    assert not (tiny / "runs").exists()


def test_a_cv_that_does_not_beat_the_trivial_baseline_is_warned_about(tiny, capsys):
    setup(tiny, train={"epochs": 1, "batch_size": 4, "lr": 1e-9})
    scores = train_experiment(load_experiment("configs/tiny/exp.yaml"))
    assert scores["cv"] <= scores["baseline_cv"]
    assert "does not beat the trivial baseline's" in capsys.readouterr().err


def test_sync_bn_under_torchrun_on_the_cpu_is_a_one_line_error(tiny):
    """SyncBatchNorm has no CPU kernels: say so before the first step, not in a traceback."""
    import dataclasses

    from pipeline.runtime.device import Runtime, World
    s = setup(tiny, train={"epochs": 1, "batch_size": 4, "sync_bn": True})
    two = dataclasses.replace(s, rt=Runtime(torch.device("cpu"), "fp32", World(0, 2, 0)))
    with pytest.raises(UserError, match="train.sync_bn: SyncBatchNorm runs on GPUs only"):
        loop.init_model(two, 0)


def test_non_finite_validation_predictions_stop_with_one_line(tiny, monkeypatch):
    s = setup(tiny, train={"epochs": 2, "batch_size": 4})
    monkeypatch.setattr(type(s), "predict_plain",
                        lambda self, model, rows: np.full((len(rows), 3), np.nan))
    with pytest.raises(UserError, match="fold 0 stage 0 epoch 1: the validation predictions are "
                                        "not finite: training diverged"):
        loop.train_fold(s, 0, tiny / "fold0")
