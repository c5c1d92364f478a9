"""Model factory: classic CNNs, pretrained sources (local file, hub cache, offline), errors."""
import socket

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.models import factory as models, finetune, pretrained
from pipeline.core.config import ModelConfig
from pipeline.core.errors import UserError


def build(backbone, pretrained=False, num_classes=3, in_chans=3):
    return models.create_model(ModelConfig(backbone=backbone, pretrained=pretrained),
                               num_classes, in_chans)


def test_classic_cnns_are_timm_models_with_the_timm_interface():
    model = timm.create_model("lenet5", num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert model.get_classifier() is model.head
    model.reset_classifier(4)
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 4)
    assert set(timm.list_models("lenet5") + timm.list_models("alexnet")) == {"lenet5", "alexnet"}
    assert timm.create_model("alexnet", num_classes=5, in_chans=1)(torch.zeros(2, 1, 63, 63)).shape == (2, 5)


@pytest.mark.parametrize("backbone, size", [("lenet5", 32), ("alexnet", 64), ("vgg16", 32),
                                            ("resnet18", 32), ("resnet50", 32),
                                            ("inception_v3", 75)])
def test_classic_cnn_builds_and_takes_a_training_step(backbone, size):
    torch.manual_seed(0)
    model = build(backbone).train()
    groups = finetune.layer_groups(model)
    assert groups[-1] == finetune.classifier_names(model) and len(groups) >= 4
    assert sorted(n for g in groups for n in g) == sorted(n for n, _ in model.named_parameters())
    head = model.get_classifier().weight
    before = head.detach().clone()
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    assert logits.shape == (2, 3)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, head.detach())


def test_local_file_goes_through_timm_head_reset_and_channel_adaptation(tmp_path):
    source = timm.create_model("lenet5", num_classes=3)  # same class count: still a fresh head
    sd = source.state_dict()
    path = tmp_path / "lenet5.safetensors"
    save_file(sd, str(path))
    torch.save({"state_dict": sd}, tmp_path / "lenet5.pth")
    for file in (path, tmp_path / "lenet5.pth"):
        torch.manual_seed(123)
        model = build("lenet5", str(file), num_classes=3, in_chans=1)
        assert torch.equal(model.features[3].weight, sd["features.3.weight"])
        assert torch.equal(model.pre_logits[1].weight, sd["pre_logits.1.weight"])
        assert torch.allclose(model.features[0].weight, sd["features.0.weight"].sum(1, keepdim=True))
        assert model.head.weight.shape == (3, 84)
        assert not model.head.weight.any() and not model.head.bias.any()  # fresh, at zero


def test_file_of_another_architecture_is_a_one_line_error(tmp_path):
    path = tmp_path / "alexnet.safetensors"
    save_file(timm.create_model("alexnet").state_dict(), str(path))
    with pytest.raises(UserError) as err:
        build("lenet5", str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "'lenet5'" in msg and "unexpected keys" in msg
    torch.save([1, 2], tmp_path / "junk.pth")
    with pytest.raises(UserError, match="no state dict"):
        build("lenet5", str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="not found"):
        build("lenet5", str(tmp_path / "absent.safetensors"))


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError, match=r"model\.backbone: unknown model 'resnet181'.*resnet18"):
        build("resnet181")
    with pytest.raises(UserError, match="tag"):
        build("resnet18.no_such_tag")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network at the socket level and an empty Hugging Face cache."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    return tmp_path / "hf"


def test_offline_pretrained_true_fails_fast_with_a_one_line_hint(offline):
    with pytest.raises(UserError) as err:
        build("resnet18", True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: true")
    assert "model.pretrained=path/to/weights.safetensors" in msg
    with pytest.raises(UserError, match="no pretrained weights for 'lenet5'"):
        build("lenet5", True)


def test_offline_pretrained_true_uses_the_hub_cache(offline):
    repo = pretrained.resolve_pretrained_cfg("test_resnet").hf_hub_id
    snapshot = offline / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (offline / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (offline / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    sd = timm.create_model("test_resnet").state_dict()
    save_file(sd, str(snapshot / "model.safetensors"))
    model = build("test_resnet", True, num_classes=4)
    assert torch.equal(model.conv1[0].weight, sd["conv1.0.weight"])
    assert model.get_classifier().weight.shape[0] == 4


def test_input_spec_comes_from_the_pretrained_config():
    lite0 = build("tf_efficientnet_lite0")
    spec = models.input_spec(lite0, ModelConfig(backbone="tf_efficientnet_lite0"))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5) and spec.crop_pct == 0.875
    spec = models.input_spec(build("lenet5"), ModelConfig(backbone="lenet5", crop_pct=0.9))
    assert spec.mean == timm.data.IMAGENET_DEFAULT_MEAN and spec.crop_pct == 0.9
    assert models.cache_size(224, 0.875) == 256


def test_drop_path_rate_gives_a_timm_model_droppath_layers_and_a_new_run_tag(tiny):
    """Stochastic depth at model.drop_path_rate: timm's per-block schedule rises to the rate
    (resnet: linearly, the last block at the rate); 0 leaves the model as it was; a model
    without DropPath layers refuses a rate it would ignore; the rate is part of the run tag."""
    from timm.layers import DropPath
    from pipeline import folds
    from pipeline.core.competition import load_competition_data
    from pipeline.core.config import load_experiment
    from pipeline.training.experiment import run_tag
    model = models.create_model(ModelConfig(backbone="test_resnet", drop_path_rate=0.2), 3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) >= 2 and max(rates) == pytest.approx(0.2) and min(rates) >= 0
    assert not any(isinstance(m, DropPath) for m in build("test_resnet").modules())
    assert build("lenet5")(torch.zeros(1, 3, 32, 32)).shape == (1, 3)  # classic CNNs unchanged
    for backbone in ("lenet5", "vgg16"):  # takes **kwargs and ignores it / does not take it
        with pytest.raises(UserError, match=f"model.drop_path_rate: '{backbone}' has no "
                                            f"stochastic depth"):
            models.create_model(ModelConfig(backbone=backbone, drop_path_rate=0.1), 3)
    folds.main(["configs/tiny/competition.yaml"])
    configs = [load_experiment("configs/tiny/lenet5.yaml", o)
               for o in ([], ["model.drop_path_rate=0.1"])]
    tags = [run_tag(cfg, load_competition_data(cfg)) for cfg in configs]
    assert tags[0] != tags[1] and tags[0].split("-")[1:] == tags[1].split("-")[1:]
