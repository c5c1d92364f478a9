"""The task seam (pipeline.tasks): heads, losses, mixing, activation, serialisation."""
import dataclasses

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup

from conftest import EXPERIMENT, write_yaml
from pipeline import folds
from pipeline.core import tasks
from pipeline.core.config import load_experiment
from pipeline.training.experiment import prepare
from pipeline.training.loop import start_fold


def test_every_task_round_trips_through_json_and_activates_to_its_columns():
    made = [tasks.Multiclass(["a", "b", "c"], [1.0, 2.0, 0.5]), tasks.Binary(["no", "yes"], [3.0]),
            tasks.Multilabel(["x", "y"], "|", [1.0, 4.0]), tasks.Regression(["v"], 10, 30, "bce"),
            tasks.Ordinal(["g"], 0, 4, "mse", [0, 1, 2, 3, 4])]
    for task in made:
        back = tasks.from_json(task.to_json())
        assert type(back) is type(task) and back.to_json() == task.to_json()
        out = back.activate(torch.zeros(4, back.n_outputs))
        assert out.shape == (4, len(task.columns)) and out.dtype == torch.float32
    assert made[1].n_outputs == 1 and made[1].activate(torch.zeros(1, 1)).tolist() == [[0.5, 0.5]]
    assert made[3].activate(torch.zeros(1, 1)).item() == 20.0  # sigmoid(0) mapped back to units


def test_losses_take_hard_and_mixed_targets():
    logits = torch.zeros(4, 2)
    ml = tasks.Multilabel(["x", "y"])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mixer = Mixup(mixup_alpha=1.0, num_classes=2)
    x, mixed = ml.mix(mixer, torch.rand(4, 3, 8, 8), y)
    assert mixed.shape == y.shape and ((mixed >= 0) & (mixed <= 1)).all()
    assert torch.isclose(ml.loss(logits, y), torch.tensor(np.log(2), dtype=torch.float32))
    reg = tasks.Regression(["v"], 0, 10)
    assert reg.loss(torch.full((2, 1), 0.5), torch.tensor([5.0, 5.0])).item() == 0.0
    mc = tasks.Multiclass(["a", "b"])
    assert torch.isclose(mc.loss(logits, torch.tensor([0, 1, 0, 1])), mc.loss(logits, torch.eye(2)[[0, 1, 0, 1]]))


def test_balanced_weights_follow_the_train_frequencies():
    class Cfg:
        task = "multiclass"

        class train:
            class_weights = "balanced"
            pos_weight = "balanced"

    train = pd.DataFrame({"target": ["a"] * 6 + ["b"] * 2})
    y = np.array([0] * 6 + [1] * 2)
    assert tasks.Multiclass.build(train, ["a", "b"], Cfg).class_weights is None  # fitted per fold
    assert tasks.Multiclass.build(train, ["a", "b"], Cfg).fit(y).class_weights == (8 / 12, 8 / 4)
    assert tasks.Binary.build(train, ["a", "b"], Cfg).fit(y).pos_weight == (3.0,)
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], dtype=np.float32)
    assert tasks.Multilabel(("x", "y"), balanced=True).fit(labels).pos_weight == (1.0, 3.0)
    assert tasks.Regression(("v",), 0, 100).fit(np.array([5.0, 7.0, 9.0])) == \
        tasks.Regression(("v",), 5.0, 9.0)


def test_a_folds_task_statistics_come_from_its_training_rows_only(tiny):
    """Leak canary: scrambling fold 0's targets leaves fold 0's task (class weights, target
    range) unchanged, while every other fold's moves."""
    write_yaml(tiny / "configs/tiny/lenet5.yaml",
               {**EXPERIMENT, "train": {**EXPERIMENT["train"], "class_weights": "balanced"}})
    folds.main(["configs/tiny/competition.yaml"])
    exp = prepare(load_experiment("configs/tiny/lenet5.yaml"))
    y = exp.comp.y.copy()
    held_out = exp.folds == 0
    y[held_out] = 0  # fold 0's rows all relabelled class 0
    scrambled = dataclasses.replace(exp, comp=dataclasses.replace(exp.comp, y=y))
    assert start_fold(scrambled, 0, tiny / "a").task == start_fold(exp, 0, tiny / "b").task
    assert start_fold(scrambled, 1, tiny / "c").task != start_fold(exp, 1, tiny / "d").task
