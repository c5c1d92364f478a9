"""Presets, custom lists, the batched executor against albumentations, mixup/cutmix, preview."""
from __future__ import annotations

import warnings

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.loss import SoftTargetCrossEntropy

from conftest import write_yaml
from pipeline import preview
from pipeline.data import augment, batch_augment
from pipeline.reports import preview as preview_grid
from pipeline.core.config import AugmentConfig, load_experiment
from pipeline.data.loader import CachedImages, PerImage
from pipeline.core.errors import UserError


def _smooth_image(side=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3)).astype(np.uint8), (5, 5), 2)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)


def _batched(ts, img) -> np.ndarray:
    run = batch_augment.compile_compose(A.Compose(ts))
    assert run is not None
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
    return run(x, np.random.default_rng(0))[0].numpy().transpose(1, 2, 0).round()


@pytest.mark.parametrize("preset", ["none", "light", "medium", "heavy"])
@pytest.mark.parametrize("size", [8, 13, 32, 57])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_preset_builds_and_runs_at_any_size(preset, size, channels):
    cfg = AugmentConfig(preset=preset, hflip=True, vflip=True)
    compose = augment.train_transform(cfg, size, seed=0)
    side = round(size / 0.875)
    x = torch.randint(0, 256, (6, channels, side, side), dtype=torch.uint8)
    batched = batch_augment.compile_compose(compose)
    assert batched is not None  # every preset has the fast path
    out = batched(x, np.random.default_rng(1))
    assert out.shape == (6, channels, size, size) and out.min() >= 0 and out.max() <= 255
    # crops and colour shifts stay uint8
    assert out.dtype == (torch.uint8 if preset in ("none", "light") else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HueSaturationValue warns that hue is moot for gray
        slow = PerImage(compose)(x, np.random.default_rng(1))
    assert slow.shape == (6, channels, size, size) and slow.dtype == torch.uint8


def test_presets_hold_the_classics():
    names = lambda ts: [type(t).__name__ for t in ts]  # noqa: E731
    light = names(augment.preset("light", 32, hflip=True, vflip=True))
    assert {"RandomResizedCrop", "HorizontalFlip", "VerticalFlip", "RGBShift"} <= set(light)
    heavy = names(augment.preset("heavy", 32, hflip=False))
    assert "HorizontalFlip" not in heavy
    for extra in ("Affine", "RandomBrightnessContrast", "HueSaturationValue", "OneOf", "CoarseDropout"):
        assert extra in heavy
    assert names(augment.preset("none", 32)) == ["CenterCrop"]


@pytest.mark.parametrize("ts,tolerance,border", [
    ([A.HorizontalFlip(p=1)], 0, 0),
    ([A.VerticalFlip(p=1)], 0, 0),
    ([A.CenterCrop(31, 29)], 0, 0),
    ([A.Resize(57, 57)], 1, 0),
    ([A.Resize(23, 23)], 1, 0),
    ([A.RandomResizedCrop((32, 32), scale=(1, 1), ratio=(1, 1))], 1, 0),
    ([A.RGBShift((20, 20), (-20, -20), (30, 30), p=1)], 0, 0),
    ([A.RGBShift((12.7, 12.7), (-7.6, -7.6), (3.3, 3.3), p=1)], 0, 0),  # whole-number shifts
    ([A.RandomBrightnessContrast((0.1, 0.1), (0.2, 0.2), p=1)], 1, 0),
    ([A.RandomBrightnessContrast((0.1, 0.1), (-0.2, -0.2), brightness_by_max=False, p=1)], 1, 0),
    ([A.HueSaturationValue((10, 10), (20, 20), (10, 10), p=1)], 4, 0),  # cv2 rounds hue to 2 degrees
    ([A.Affine(rotate=(30, 30), p=1)], 1, 6),
    ([A.Affine(scale=(1.2, 1.2), translate_px={"x": (3, 3), "y": (-2, -2)}, shear=(5, 5), p=1)], 1, 8),
    ([A.HorizontalFlip(p=1), A.Affine(rotate=(-20, -20), p=1), A.CenterCrop(24, 24)], 1, 4),
    ([A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(1.2, 1.2), p=1)], 1, 0),
])
def test_batched_matches_albumentations(ts, tolerance, border):
    """Fixed parameters: the batched executor reproduces albumentations' pixels."""
    img = _smooth_image()
    expected = A.Compose(ts, seed=0)(image=img)["image"].astype(int)
    got = _batched(ts, img).astype(int)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    if border:
        diff = diff[border:-border, border:-border]
    assert diff.max() <= tolerance


def test_random_resized_crop_draws_albumentations_boxes():
    op = batch_augment.RandomResizedCrop((16, 16), scale=(0.3, 0.7), ratio=(0.5, 2.0))
    m, h, w = op.matrix(4000, 40, 50, np.random.default_rng(0))
    cw, ch = m[:, 0, 0] * 16, m[:, 1, 1] * 16
    x0, y0 = m[:, 0, 2] - 0.5 * m[:, 0, 0] + 0.5, m[:, 1, 2] - 0.5 * m[:, 1, 1] + 0.5
    area = cw * ch / 2000
    assert (h, w) == (16, 16)
    assert area.min() > 0.28 and area.max() < 0.72 and 0.45 < area.mean() < 0.55
    assert (cw / ch).min() > 0.45 and (cw / ch).max() < 2.2
    assert (x0 >= 0).all() and (x0 + cw <= 50).all() and (y0 >= 0).all() and (y0 + ch <= 40).all()
    assert np.allclose(x0, np.round(x0)) and np.allclose(cw, np.round(cw))  # whole-pixel boxes


@pytest.mark.parametrize("preset", ["none", "light", "medium", "heavy"])
def test_a_batch_depends_only_on_its_slots_of_the_epoch_plan(preset):
    """Parameters are drawn for an epoch's slots at once; any batch of slots gives the pixels the
    whole epoch gives for them (heavy's blur-or-noise keeps only the blur: a noise field is
    seeded per batch)."""
    compose = augment.train_transform(AugmentConfig(preset=preset, hflip=True), 16, seed=0)
    if preset == "heavy":
        compose = A.Compose([A.GaussianBlur(p=0.5) if isinstance(t, A.OneOf) else t
                             for t in compose.transforms])
    run = batch_augment.compile_compose(compose)
    images = np.random.default_rng(0).integers(0, 256, (30, 18, 18, 3), dtype=np.uint8)
    index = np.random.default_rng(1).permutation(30)[:24]
    plan = run.plan(24, 3, 18, 18, np.random.default_rng(2))
    whole = run.apply(images, index, plan)
    parts = torch.cat([run.apply(images, index[a:a + 7], plan[a:a + 7]) for a in range(0, 24, 7)])
    assert whole.shape == (24, 3, 16, 16) and torch.equal(parts, whole)
    again = run.apply(images, index, run.plan(24, 3, 18, 18, np.random.default_rng(2)))
    other = run.apply(images, index, run.plan(24, 3, 18, 18, np.random.default_rng(3)))
    assert torch.equal(again, whole) and (preset == "none") == torch.equal(other, whole)


@pytest.mark.parametrize("ts,stage", [
    ([A.Resize(12, 12)], None),  # nothing moves: no stage
    ([A.CenterCrop(8, 10)], batch_augment.Crop),
    ([A.RandomResizedCrop((9, 9)), A.HorizontalFlip(p=0.5)], batch_augment.CropResize),
    ([A.Affine(rotate=(-20, 20), p=1)], batch_augment.Warp),
    ([A.RandomBrightnessContrast(p=1), A.CenterCrop(8, 8)], batch_augment.Crop),  # float batch
    ([A.RandomBrightnessContrast(p=1), A.RandomResizedCrop((9, 9))], batch_augment.Warp),
])
def test_geometry_takes_the_cheapest_stage_and_reads_the_cache_rows_directly(ts, stage):
    run = batch_augment.compile_compose(A.Compose(ts))
    plan = run.plan(10, 3, 12, 12, np.random.default_rng(0))
    resampling = [op for op, p in plan.stages if "mask" not in p]
    assert [type(op) for op in resampling] == ([stage] if stage else [])
    images = np.random.default_rng(1).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    index = np.arange(16)[::-1][:10]
    gathered = torch.from_numpy(images[index]).permute(0, 3, 1, 2)
    direct = run.apply(images, index, plan)  # the first stage reads rows of the cache itself
    assert torch.equal(direct, run.apply(images[index], np.arange(10), plan))
    if stage in (batch_augment.Crop, batch_augment.CropResize) and plan.stages[0][0] == resampling[0]:
        op, p = plan.stages[0]
        assert torch.equal(op.gather(images, index, p), op.apply(gathered, p))


def test_coarse_dropout_cuts_the_configured_holes():
    img = np.full((16, 16, 3), 200, np.uint8)
    out = _batched([A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.25, 0.25),
                                    hole_width_range=(0.25, 0.25), p=1)], img)
    holes = (out == 0).all(2)
    rows, cols = np.flatnonzero(holes.any(1)), np.flatnonzero(holes.any(0))
    assert holes.sum() == 16 and len(rows) == 4 and len(cols) == 4 and (out[~holes] == 200).all()


def test_noise_and_oneof_follow_their_parameters():
    x = torch.full((400, 3, 24, 24), 128, dtype=torch.uint8)
    noisy = batch_augment.compile_compose(A.Compose([A.GaussNoise(std_range=(0.04, 0.04), p=1)]))
    std = (noisy(x, np.random.default_rng(0)).float() - 128).std().item()
    assert 0.035 * 255 < std < 0.045 * 255
    one_of = batch_augment.compile_compose(A.Compose([A.OneOf(
        [A.RGBShift((30, 30), (30, 30), (30, 30)), A.RGBShift((-30, -30), (-30, -30), (-30, -30))],
        p=0.5)]))
    out = one_of(x, np.random.default_rng(0))[:, 0, 0, 0]
    up, down = (out == 158).float().mean().item(), (out == 98).float().mean().item()
    assert 0.2 < up < 0.3 and 0.2 < down < 0.3 and ((out == 98) | (out == 128) | (out == 158)).all()


def test_grayscale_gets_value_shift_and_a_single_channel_shift():
    x = torch.full((8, 1, 10, 10), 100, dtype=torch.uint8)
    hsv = batch_augment.compile_compose(A.Compose([A.HueSaturationValue((50, 50), (50, 50), (20, 20), p=1)]))
    assert (hsv(x, np.random.default_rng(0)) == 120).all()
    shift = batch_augment.compile_compose(A.Compose([A.RGBShift((-30, -30), (50, 50), (50, 50), p=1)]))
    assert (shift(x, np.random.default_rng(0)) == 70).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_colour_shift_is_the_same_in_either_memory_layout(dtype):
    """Batches in NHWC memory (crops from the cache) take a row-wise path; same pixels."""
    shift = batch_augment.RGBShift([(-40 / 255, 40 / 255)] * 3)
    x = torch.from_numpy(_smooth_image(12)).expand(16, 12, 12, 3).permute(0, 3, 1, 2).to(dtype)
    mask = np.arange(16) % 3 > 0
    params = shift.draw(16, 3, 12, 12, np.random.default_rng(5), mask)
    nchw = shift.apply(x.clone(memory_format=torch.contiguous_format), params)
    nhwc = shift.apply(x.clone(memory_format=torch.channels_last), params)
    assert nhwc.dtype == dtype and torch.equal(nchw, nhwc)
    assert torch.equal(nchw[~torch.from_numpy(mask)], x[~torch.from_numpy(mask)])  # off: unchanged
    assert (nchw == 255).any() and (nchw == 0).any() and not torch.equal(nchw, x)  # saturates


def test_unsupported_transforms_fall_back_to_albumentations_per_image():
    compose = A.Compose([A.ToGray(p=1), A.Resize(8, 8)])
    assert batch_augment.compile_compose(compose) is None
    ds = CachedImages(np.random.default_rng(0).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8),
                      np.arange(4), np.zeros(4), compose)
    assert isinstance(ds.augment, PerImage)
    x, _ = ds.batch(np.arange(4))
    assert x.shape == (4, 3, 8, 8) and (x[:, 0] == x[:, 1]).all()


def test_custom_list_is_built_by_name_and_errors_name_the_item():
    cfg = AugmentConfig(custom=[{"name": "HorizontalFlip", "p": 1.0},
                                {"name": "RGBShift", "r_shift_limit": 10, "p": 0.3}])
    ts = augment.train_transform(cfg, 16, seed=0).transforms
    assert [type(t).__name__ for t in ts] == ["HorizontalFlip", "RGBShift", "Resize"]
    assert ts[1].r_shift_limit == (-10, 10) and ts[1].p == 0.3
    with pytest.raises(UserError, match=r"augment.custom\[1\].name: 'os.system'"):
        augment.custom([{"name": "Blur"}, {"name": "os.system"}])
    with pytest.raises(UserError, match=r"augment.custom\[0\] \(RGBShift\)"):
        augment.custom([{"name": "RGBShift", "no_such_argument": 3}])


def test_eval_view_is_the_centre_crop():
    x = np.arange(2 * 7 * 7 * 3, dtype=np.uint8).reshape(2, 7, 7, 3)
    out, _ = CachedImages(x, np.arange(2), None, augment.eval_transform(4)).batch(np.arange(2))
    np.testing.assert_array_equal(out.numpy(), x[:, 1:5, 1:5].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("mixup,cutmix,smoothing", [(0.4, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 1.0, 0.1)])
def test_mixed_targets_sum_to_one_and_the_loss_takes_them(mixup, cutmix, smoothing):
    np.random.seed(0)
    cfg = AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix)
    mix = augment.mixer(cfg, num_classes=5, label_smoothing=smoothing, batch_size=8)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mixed, soft = mix(x.clone(), y)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8))
    lam = soft[0, 0].item() if not smoothing else None
    if mixup and not cutmix and lam is not None:  # images mixed with the same weight as targets
        assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    logits = torch.randn(8, 5)
    expected = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(SoftTargetCrossEntropy()(logits, soft), expected)


def test_soft_loss_equals_cross_entropy_on_one_hot_targets():
    logits, y = torch.randn(6, 4), torch.tensor([0, 3, 1, 2, 2, 0])
    one_hot = F.one_hot(y, 4).float()
    assert torch.allclose(SoftTargetCrossEntropy()(logits, one_hot), F.cross_entropy(logits, y))


def test_mixing_is_off_by_default_and_needs_an_even_batch():
    assert augment.mixer(AugmentConfig(), 5, 0.0, 7) is None
    with pytest.raises(UserError, match="train.batch_size: .* even"):
        augment.mixer(AugmentConfig(cutmix_alpha=1.0), 5, 0.0, 7)


@pytest.mark.parametrize("channels", [3, 1])
def test_preview_writes_a_grid_of_the_expected_size(tiny, capsys, channels):
    write_yaml(tiny / "configs/tiny/mixed.yaml", {
        "competition": "competition.yaml", "model": {"backbone": "lenet5"},
        "data": {"channels": channels},
        "augment": {"preset": "heavy", "hflip": False, "mixup_alpha": 0.4}})
    preview.main(["configs/tiny/mixed.yaml"])
    path = capsys.readouterr().out.strip()
    assert path.endswith("runs/tiny/mixed/preview.png")
    img = Image.open(path)
    assert img.size == preview_grid.grid_size(8, 1 + 6 + 1) and img.mode == "RGB"
    grid = np.asarray(img)
    p = preview_grid
    first = grid[p.HEADER + p.GAP: p.HEADER + p.GAP + p.CELL, p.GAP: p.GAP + p.CELL]
    assert first.std() > 0  # an image was drawn, not a blank cell
    cfg = load_experiment("configs/tiny/mixed.yaml")
    _, views = preview_grid.sample_views(cfg, 3, 2)
    assert views.shape == (3, 1 + 2 + 1, channels, 16, 16)
