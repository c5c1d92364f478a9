"""The task seam (pipeline.tasks): heads, losses, mixing, activation, serialisation."""
import numpy as np
import pandas as pd
import torch
from timm.data import Mixup

from pipeline.core import tasks


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
    assert tasks.Multiclass.build(train, ["a", "b"], Cfg).class_weights == (8 / 12, 8 / 4)
    assert tasks.Binary.build(train, ["a", "b"], Cfg).pos_weight == (3.0,)
