"""Progressive unfreezing: groups, stage plans, per-group rates, schedules, frozen layers stay put."""
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import EXPERIMENT, write_yaml
from pipeline import folds
from pipeline.models import finetune
from pipeline.training.experiment import prepare
from pipeline.training.loop import init_model, train_fold
from pipeline.core.config import ExperimentConfig, StageConfig, load_experiment
from pipeline.core.errors import UserError


def test_layer_groups_cover_every_parameter_once_with_the_classifier_last():
    for model in (timm.create_model("lenet5", num_classes=3), timm.create_model("test_resnet")):
        groups = finetune.layer_groups(model)
        names = [n for g in groups for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert len(names) == len(set(names))
        assert groups[-1] == finetune.classifier_names(model) and groups[-1]
    resnet = finetune.layer_groups(timm.create_model("test_resnet"))
    assert resnet[0][0].startswith("conv1") and resnet[-2][0].startswith("layer4")


def test_model_without_group_matcher_falls_back_to_top_level_children():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert finetune.layer_groups(model) == [["0.weight", "0.bias"], ["1.weight", "1.bias"],
                                            ["3.weight", "3.bias"]]


def test_trainable_spec_head_integer_all():
    assert finetune.resolve_trainable("head", 6) == 1
    assert finetune.resolve_trainable("all", 6) == 6
    assert finetune.resolve_trainable(3, 6) == 3
    assert finetune.resolve_trainable(9, 6) == 6


def test_group_rates_follow_the_ratio_or_layer_decay():
    lrs = finetune.group_lrs(1e-3, 4, 2.6, None)
    assert lrs[-1] == 1e-3
    assert all(math.isclose(lo * 2.6, hi) for lo, hi in zip(lrs, lrs[1:]))
    lrs = finetune.group_lrs(1e-3, 3, 2.6, 0.5)
    assert np.allclose(lrs, [2.5e-4, 5e-4, 1e-3])


def test_random_init_trains_every_group_at_the_base_rate_unless_decay_is_set():
    base = dict(name="x", data={"root": "."}, experiment="e")
    scratch = ExperimentConfig.model_validate({**base, "model": {"backbone": "lenet5"}})
    assert finetune.decay_factors(scratch) == (1.0, None)
    tuned = ExperimentConfig.model_validate({**base, "model": {"backbone": "lenet5"},
                                             "finetune": {"layer_decay": 0.7}})
    assert finetune.decay_factors(tuned) == (2.6, 0.7)
    pretrained = ExperimentConfig.model_validate(
        {**base, "model": {"backbone": "lenet5", "pretrained": "w.safetensors"}})
    assert finetune.decay_factors(pretrained) == (2.6, None)


def test_schedules_warm_up_then_decay():
    f = [finetune.schedule_factor(i, 10, 2, "cosine") for i in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0
    assert all(a > b for a, b in zip(f[2:], f[3:])) and 0 < f[-1] < 0.05
    one = [finetune.schedule_factor(i, 10, 0, "onecycle") for i in range(10)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == one[3] == 1.0 and one[-1] < 0.05


def test_auto_policy_scales_freeze_depth_with_data_and_logs_it(capsys):
    small = finetune.auto_stages(300, 8, 9)
    medium = finetune.auto_stages(5_000, 8, 9)
    large = finetune.auto_stages(50_000, 8, 9)
    assert [(s.epochs, s.train) for s in small] == [(8, "head")]
    assert [(s.epochs, s.train) for s in medium] == [(2, "head"), (6, 5)]
    assert [(s.epochs, s.train) for s in large] == [(1, "head"), (7, "all")]
    log = capsys.readouterr().err
    assert log.count("finetune.policy=auto") == 3 and "300 training images" in log


def test_explicit_epochs_rescale_stages_and_auto_excludes_stages():
    stages = [StageConfig(epochs=1, train="head"), StageConfig(epochs=2, train=3),
              StageConfig(epochs=5, train="all")]
    assert [s.epochs for s in finetune.fit_stages(stages, 16)] == [2, 4, 10]
    assert [(s.epochs, s.train) for s in finetune.fit_stages(stages, 2)] == [(1, 3), (1, "all")]
    base = dict(name="x", data={"root": "."}, experiment="e", model={"backbone": "lenet5"})
    cfg = ExperimentConfig.model_validate({**base, "train": {"epochs": 4},
                                           "finetune": {"stages": [s.model_dump() for s in stages]}})
    assert [s.epochs for s in finetune.stage_plan(cfg, 100, 4)] == [1, 1, 2]
    cfg = ExperimentConfig.model_validate({**base, "finetune": {"stages": [s.model_dump() for s in stages]}})
    assert [(s.epochs, s.trainable) for s in finetune.stage_plan(cfg, 100, 4)] == [(1, 1), (2, 3), (5, 4)]
    cfg = ExperimentConfig.model_validate({**base, "finetune": {"policy": "auto", "stages": [{"epochs": 1}]}})
    with pytest.raises(UserError, match="policy: auto or stages"):
        finetune.stage_plan(cfg, 100, 4)


def test_norms_and_biases_get_no_weight_decay():
    model = timm.create_model("test_resnet", num_classes=3)
    groups = finetune.layer_groups(model)
    pg = finetune.param_groups(model, groups, finetune.group_lrs(1e-3, len(groups), 2.6, None), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in pg:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05), names[id(p)]
    assert sorted(g["layer_group"] for g in pg)[-1] == len(groups) - 1


def fold_setup(tiny, **experiment):
    write_yaml(tiny / "configs/tiny/exp.yaml", {**EXPERIMENT, **experiment})
    folds.main(["configs/tiny/competition.yaml"])
    return prepare(load_experiment("configs/tiny/exp.yaml"))


def frozen_names(model, trainable):
    groups = finetune.layer_groups(model)
    return [n for g in groups[: len(groups) - trainable] for n in g]


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_head_only_stage_leaves_frozen_weights_and_frozen_bn_stats_untouched(tiny, bn):
    s = fold_setup(tiny, model={"backbone": "test_resnet"},
                   finetune={"stages": [{"epochs": 2, "train": "head"}], "bn": bn},
                   train={"batch_size": 4, "lr": 0.01, "weight_decay": 0.1})
    start = {k: v.clone() for k, v in init_model(s, 0).state_dict().items()}
    train_fold(s, 0, tiny / "fold0")
    end = torch.load(tiny / "fold0/last.pt", weights_only=True)["model"]
    model = init_model(s, 0)
    frozen = frozen_names(model, 1)
    assert set(frozen) == {n for n, _ in model.named_parameters()} - {"fc.weight", "fc.bias"}
    assert all(torch.equal(start[n], end[n]) for n in frozen)
    assert not torch.equal(start["fc.weight"], end["fc.weight"])
    stats = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = [k for k in stats if not torch.equal(start[k], end[k])]
    assert moved == ([] if bn == "frozen" else stats)
    best = load_file(str(tiny / "fold0/best.safetensors"))
    assert all(torch.equal(start[n], best[n]) for n in frozen)


def test_log_records_each_group_rate_by_ratio_with_a_restart_per_stage(tiny):
    lr = 0.004
    s = fold_setup(tiny, finetune={"stages": [{"epochs": 2, "train": "head"},
                                              {"epochs": 2, "train": 2},
                                              {"epochs": 2, "train": "all"}],
                             "lr_decay": 2.6},
                   train={"batch_size": 4, "lr": lr})
    train_fold(s, 0, tiny / "fold0")
    log = pd.read_csv(tiny / "fold0/log.csv")
    lrs = log[[f"lr_group{i}" for i in range(4)]].to_numpy()  # lenet5: 4 groups
    assert list(log["stage"]) == [0, 0, 1, 1, 2, 2] and list(log["trainable_groups"]) == [1, 1, 2, 2, 4, 4]
    for row, k in zip(lrs, log["trainable_groups"]):
        assert (row[: 4 - k] == 0).all() and (row[4 - k:] > 0).all()
        assert np.allclose(row[4 - k:][:-1] * 2.6, row[4 - k:][1:], rtol=1e-6)
    top = lrs[:, -1]
    assert np.allclose(top[[0, 2, 4]], lr)  # each stage starts its schedule afresh
    assert (top[[1, 3, 5]] < lr * 0.6).all()
    steps = 3  # 12 training images, batch 4
    assert np.isclose(top[1], lr * finetune.schedule_factor(steps, 2 * steps, 0, "cosine"))
