"""TTA views against direct slicing, batching into one forward pass, merging and fold averaging."""
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models import tta
from pipeline.data.augment import eval_transform
from pipeline.core.config import ViewSet
from pipeline.models.tta import View
from pipeline.training.prediction import distinct_view_sets

SIDE, SIZE = 19, 16  # odd margin: the centre crop must round like the train stage's


def rot90(a: np.ndarray, k: int) -> np.ndarray:
    """Counter-clockwise quarter turns by slicing: out[i, j] = a[j, n-1-i] for one turn."""
    for _ in range(k):
        a = a.swapaxes(-1, -2)[..., ::-1, :]
    return a


def zoomed(a: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """The `side` crop at (top, left) resized to `size`: bilinear, antialiased, rounded."""
    crop = torch.from_numpy(np.ascontiguousarray(a[..., top:top + side, left:left + side]))
    out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.round().to(crop.dtype).numpy()


def expected_views(a: np.ndarray, size: int) -> dict[str, list[np.ndarray]]:
    """Every view set of N x C x H x W `a`, written out with plain numpy slices (multiscale:
    crops of round(size * zoom) pixels, clipped to the image, resized to `size`)."""
    h, w = a.shape[-2:]
    t, l = (h - size) // 2, (w - size) // 2
    c = a[..., t:t + size, l:l + size]
    zooms = [min(round(size * z), h, w) for z in (0.9, 1 / 0.9)]
    five = [a[..., :size, :size], a[..., :size, w - size:], a[..., h - size:, :size],
            a[..., h - size:, w - size:], c]
    mirror = lambda v: v[..., ::-1]  # noqa: E731
    return {
        "none": [c],
        "hflip": [c, mirror(c)],
        "five_crop": five,
        "ten_crop": five + [mirror(v) for v in five],
        "dihedral8": [rot90(c, k) for k in range(4)] + [rot90(mirror(c), k) for k in range(4)],
        "multiscale": [c] + [zoomed(a, (h - s) // 2, (w - s) // 2, s, size) for s in zooms],
    }


@pytest.fixture
def images() -> torch.Tensor:
    return torch.arange(2 * 3 * SIDE * SIDE).view(2, 3, SIDE, SIDE)


def test_config_view_sets_match_the_implemented_ones():
    assert set(get_args(ViewSet)) == set(tta.VIEW_SETS)


@pytest.mark.parametrize("view_set", list(tta.VIEW_SETS))
def test_every_view_is_the_expected_slice(images, view_set):
    got = [tta.apply_view(images, SIZE, v) for v in tta.VIEW_SETS[view_set]]
    want = expected_views(images.numpy(), SIZE)[view_set]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == (2, 3, SIZE, SIZE)
        np.testing.assert_array_equal(g.numpy(), w)
    distinct = {tuple(v.flatten().tolist()) for v in got}
    assert len(distinct) == len(got)  # no view silently repeats another


def test_stacked_views_are_image_major_copies_of_each_view(images):
    needed = tta.union(list(tta.VIEW_SETS))
    stacked = tta.stack_views(images, SIZE, needed)
    assert stacked.shape == (2 * len(needed), 3, SIZE, SIZE)
    per_image = stacked.reshape(2, len(needed), 3, SIZE, SIZE)
    for i, view in enumerate(needed):
        np.testing.assert_array_equal(per_image[:, i].numpy(),
                                      tta.apply_view(images, SIZE, view).numpy())


def test_rotation_turns_counter_clockwise():
    x = torch.tensor([[[[1, 2], [3, 4]]]])
    turned = tta.apply_view(x, 2, View("centre", False, 1))
    assert turned[0, 0].tolist() == [[2, 4], [1, 3]]
    assert tta.apply_view(x, 2, View("centre", True, 0))[0, 0].tolist() == [[2, 1], [4, 3]]


@pytest.mark.parametrize("side,size", [(19, 16), (37, 32), (36, 32), (32, 32)])
def test_centre_view_is_the_train_stage_eval_crop(side, size):
    hwc = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    plain = eval_transform(size)(image=hwc)["image"]
    view = tta.apply_view(torch.from_numpy(hwc.transpose(2, 0, 1))[None], size, View("centre"))
    np.testing.assert_array_equal(view[0].numpy().transpose(1, 2, 0), plain)


def test_union_shares_views_between_sets():
    assert tta.union(["none"]) == (View("centre"),)
    assert tta.union(["five_crop", "none", "hflip"]) == tta.VIEW_SETS["five_crop"] + (
        View("centre", True),)
    assert len(tta.union(list(tta.VIEW_SETS))) == 18  # 5 crops, 5 mirrored, 6 rotations, 2 zooms


def test_merge_known_values():
    p = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])  # 2 views x 1 image x 2 classes
    torch.testing.assert_close(tta.merge(p, "mean"), torch.tensor([[0.7, 0.3]]))
    # sqrt(.45) : sqrt(.05) = 3 : 1
    torch.testing.assert_close(tta.merge(p, "geometric"), torch.tensor([[0.75, 0.25]]))
    with pytest.raises(ValueError, match="unknown merge"):
        tta.merge(p, "median")


def test_average_folds_known_values():
    folds = [np.array([[1.0, 0.0], [0.2, 0.8]]), np.array([[0.5, 0.5], [0.4, 0.6]])]
    np.testing.assert_allclose(tta.average_folds(folds), [[0.75, 0.25], [0.3, 0.7]])


class Linear(torch.nn.Module):
    """Toy model: logits are a fixed linear function of the pixels; records its batch sizes."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = torch.from_numpy(weight)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return x.flatten(1).double() @ self.weight.T


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("how", ["mean", "geometric"])
@pytest.mark.parametrize("max_batch", [1, 7, 10_000])
def test_predict_sets_merges_the_known_outputs_of_every_view(how, max_batch):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, (3, 1, SIDE, SIDE), dtype=np.uint8))
    weight = rng.normal(0, 0.05, (4, SIZE * SIZE))
    model = Linear(weight)
    got = tta.predict_sets(model, x, SIZE, list(tta.VIEW_SETS), how,
                           lambda v: v.float() / 255, max_batch)
    for name, vs in expected_views(x.numpy(), SIZE).items():
        p = np.stack([softmax(v.reshape(3, -1) / 255 @ weight.T) for v in vs])  # V x N x K
        want = p.mean(0) if how == "mean" else softmax(np.log(p).mean(0))
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-5, atol=1e-6)
    assert sum(model.calls) == 18 * 3  # shared views go through the model once
    assert max(model.calls) <= max_batch


def test_all_views_of_a_batch_go_through_one_forward_pass():
    model = Linear(np.zeros((2, SIZE * SIZE)))
    x = torch.zeros(5, 1, SIDE, SIDE, dtype=torch.uint8)
    out = tta.predict_sets(model, x, SIZE, ["ten_crop"], "mean", lambda v: v.float(), 50)
    assert model.calls == [50] and out["ten_crop"].shape == (5, 2)
    model.calls.clear()
    tta.predict_sets(model, x, SIZE, ["ten_crop"], "mean", lambda v: v.float(), 20)
    assert model.calls == [20, 20, 10]  # chunked only when the batch exceeds max_batch


def test_index_tensors_are_made_once_per_device_and_reused(monkeypatch):
    """The pixel gather index and each view set's rows are built once per (inputs, device),
    not per batch (on a GPU each was a host-to-device copy); predictions are unchanged."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.integers(0, 256, (3, 1, SIDE, SIDE), dtype=np.uint8))
    model = Linear(rng.normal(0, 0.05, (4, SIZE * SIZE)))
    sets = ["hflip", "five_crop", "ten_crop"]  # each a part of their union: picked by rows
    first = tta.predict_sets(model, x, SIZE, sets, "mean", lambda v: v.float() / 255, 100)
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    again = tta.predict_sets(model, x, SIZE, sets, "mean", lambda v: v.float() / 255, 100)
    monkeypatch.undo()
    assert made == [] and all(torch.equal(first[s], again[s]) for s in sets)
    needed, cpu, meta = tta.union(sets), torch.device("cpu"), torch.device("meta")
    assert tta.gather_index(SIDE, SIDE, SIZE, needed, cpu) is \
        tta.gather_index(SIDE, SIDE, SIZE, needed, cpu)
    on_meta = tta.gather_index(SIDE, SIDE, SIZE, needed, meta)
    assert on_meta.device == meta and on_meta is tta.gather_index(SIDE, SIDE, SIZE, needed, meta)
    assert tta.view_rows("hflip", needed, cpu) is tta.view_rows("hflip", needed, cpu)


@pytest.mark.parametrize("side", [16, 19, 40])
def test_multiscale_zooms_the_centre_crop_clipped_to_the_image(side):
    """Crops of 16, 14 and 18 px (1, 0.9, 1/0.9 of 16) around the centre, each resized to 16 px
    as PIL's bilinear filter would (within one grey level); at 16 px the zoom out is clipped to
    the whole image, so it is the centre view again."""
    boxes = [tta.crop_box(v, side, side, 16) for v in tta.VIEW_SETS["multiscale"]]
    zoom_out = min(18, side)
    assert boxes == [((side - 16) // 2, (side - 16) // 2, 16), ((side - 14) // 2,) * 2 + (14,),
                     ((side - zoom_out) // 2,) * 2 + (zoom_out,)]
    hwc = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    x = torch.from_numpy(hwc.transpose(2, 0, 1))[None]
    for view, (top, left, crop) in zip(tta.VIEW_SETS["multiscale"], boxes):
        got = tta.apply_view(x, 16, view)[0].numpy()
        assert got.shape == (3, 16, 16) and got.dtype == np.uint8
        pil = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(
            hwc[top:top + crop, left:left + crop, ch])).resize((16, 16), Image.BILINEAR))
            for ch in range(3)])
        assert np.abs(got.astype(int) - pil).max() <= 1
    if side == 16:
        assert torch.equal(tta.apply_view(x, 16, tta.VIEW_SETS["multiscale"][2]), x)


def test_multiscale_is_its_own_view_set_at_every_crop():
    kept, same = distinct_view_sets(list(tta.VIEW_SETS), 16, 16)
    assert "multiscale" in kept and "multiscale" not in same
    assert distinct_view_sets(["none", "multiscale"], 19, 16) == (["none", "multiscale"], {})
    assert tta.union(["none", "multiscale"])[0] == View("centre")  # the centre view is shared


def test_a_multiscale_prediction_of_uint8_images_merges_its_three_views():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, SIDE, SIDE), dtype=np.uint8))
    weight = rng.normal(0, 0.02, (5, 3 * SIZE * SIZE))
    model = Linear(weight)
    got = tta.predict_sets(model, x, SIZE, ["none", "multiscale"], "mean",
                           lambda v: v.float() / 255, 6)
    views = [tta.apply_view(x, SIZE, v).numpy().reshape(4, -1) / 255
             for v in tta.VIEW_SETS["multiscale"]]
    want = np.mean([softmax(v @ weight.T) for v in views], axis=0)
    np.testing.assert_allclose(got["multiscale"].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["none"].numpy(), softmax(views[0] @ weight.T), rtol=1e-5)
    assert sum(model.calls) == 3 * 4 and max(model.calls) <= 6
