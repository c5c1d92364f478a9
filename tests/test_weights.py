"""`make weights`: the bundled EfficientNet-Lite0 weights, converted, classify real photos."""
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from skimage import data as photos
from timm.data import create_transform, resolve_data_config

from pipeline import imagenet
from pipeline.models import pretrained
from pipeline.core.config import ModelConfig
from pipeline.models.factory import create_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    imagenet.main([str(out)])
    return out


def test_converted_weights_classify_real_photos(converted):
    model = timm.create_model(pretrained.LITE0_ARCHITECTURE, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(converted))).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    transform = create_transform(**cfg)
    batch = torch.stack([transform(Image.fromarray(photos.chelsea())),
                         transform(Image.fromarray(photos.coffee()))])
    with torch.inference_mode():
        top1 = model(batch).argmax(1).tolist()
    assert 281 <= top1[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[1] in (967, 968)  # espresso, cup


def test_converted_file_is_timm_format_and_fine_tunes_with_a_new_head(converted):
    with safe_open(str(converted), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["architecture"] == "tf_efficientnet_lite0"
    reference = timm.create_model(pretrained.LITE0_ARCHITECTURE).state_dict()
    assert keys == {k for k in reference if not k.endswith("num_batches_tracked")}
    assert not list(converted.parent.glob(".*tmp"))  # written atomically, nothing left behind
    model = create_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained=str(converted)), 10)
    assert model.classifier.weight.shape == (10, 1280)


def test_conversion_refuses_tensors_that_do_not_pair():
    target = timm.create_model("lenet5").state_dict()
    source = {f"x{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(target.items())}
    assert list(pretrained.convert_state_dict(source, target)) == list(target)
    with pytest.raises(ValueError, match="source tensors"):
        pretrained.convert_state_dict(dict(list(source.items())[:-1]), target)
    swapped = dict(source)
    swapped["x0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not pair"):
        pretrained.convert_state_dict(swapped, target)
    with pytest.raises(SystemExit) as exit_info:
        imagenet.main(["weights/lite0.pth"])
    assert exit_info.value.code == 2

