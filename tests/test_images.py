"""Decoding any image mode to uint8, the resized cache, and bad-image handling."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_yaml
from pipeline.core import competition
from pipeline.data import images
from pipeline.training.experiment import prepare
from pipeline.core.config import load_competition, load_experiment
from pipeline.core.errors import UserError


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda: Image.new("L", (5, 4), 77), (77, 77, 77)),
    (lambda: Image.new("1", (5, 4), 1), (255, 255, 255)),
    (lambda: Image.new("RGB", (5, 4), (10, 200, 30)), (10, 200, 30)),
    (lambda: Image.new("RGBA", (5, 4), (10, 200, 30, 255)), (10, 200, 30)),
    (lambda: Image.new("RGBA", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
    (lambda: Image.new("LA", (5, 4), (40, 255)), (40, 40, 40)),
    (lambda: Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
    (lambda: Image.new("CMYK", (5, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((4, 5), 257 * 100, np.uint16)), (100, 100, 100)),  # I;16
    (lambda: Image.fromarray(np.full((4, 5), 65535, np.int32)), (255, 255, 255)),  # I, 16-bit range
    (lambda: Image.fromarray(np.full((4, 5), 0.5, np.float32)), (128, 128, 128)),  # F in [0, 1]
])
def test_every_mode_becomes_three_channel_uint8(make, expected):
    arr = images.to_uint8(make())
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8
    assert tuple(arr[0, 0]) == expected


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    assert tuple(images.to_uint8(pal)[0, 0]) == (200, 10, 20)
    pal.info["transparency"] = 1
    assert tuple(images.to_uint8(pal)[0, 0]) == (255, 255, 255)


def test_one_channel_is_luminance():
    arr = images.to_uint8(Image.new("RGB", (3, 2), (255, 0, 0)), channels=1)
    assert arr.shape == (2, 3, 1) and arr[0, 0, 0] == 76  # ITU-R 601 luma of pure red


def test_sixteen_bit_png_file_round_trips(tmp_path):
    gray = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    path = _save(Image.fromarray(gray), tmp_path / "g16.png")
    out = images.decode(path)
    np.testing.assert_array_equal(out[..., 0], np.round(gray / 257.0).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    assert images.decode(path).shape == (6, 2, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="bad.png: cannot decode image"):
        images.decode(path)


def _png_set(folder, n=5, side=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (side + i, side, 3), dtype=np.uint8)  # not square on purpose
        paths.append(str(_save(Image.fromarray(arr), folder / f"{i}.png")))
    return paths


@pytest.mark.parametrize("side,channels", [(12, 3), (31, 3), (16, 1)])
def test_cache_holds_exactly_the_decoded_resized_pixels(tmp_path, side, channels):
    paths = _png_set(tmp_path / "img")
    cache = images.image_cache(paths, side, channels, tmp_path / "cache")
    assert cache.shape == (5, side, side, channels) and cache.dtype == np.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache[i], images.resize(images.decode(p, channels), side))


def test_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    paths = _png_set(tmp_path / "img")
    first = images.image_cache(paths, 16, 3, tmp_path / "cache")
    built = list((tmp_path / "cache").glob("*.npy"))
    calls = []
    monkeypatch.setattr(images, "decode", lambda *a: calls.append(a) or np.zeros((2, 2, 3), np.uint8))
    again = images.image_cache(paths, 16, 3, tmp_path / "cache")
    assert calls == [] and list((tmp_path / "cache").glob("*.npy")) == built
    np.testing.assert_array_equal(first, again)
    monkeypatch.undo()

    Image.new("RGB", (20, 20), (9, 99, 199)).save(paths[2])
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    rebuilt = images.image_cache(paths, 16, 3, tmp_path / "cache")
    assert tuple(rebuilt[2, 0, 0]) == (9, 99, 199)
    np.testing.assert_array_equal(rebuilt[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    remaining = list((tmp_path / "cache").glob("*.npy"))
    assert len(remaining) == 1 and remaining != built  # the stale cache is gone


def test_cache_is_shared_by_experiments_of_the_same_size(tiny):
    write_yaml(tiny / "configs/tiny/resnet.yaml", {"competition": "competition.yaml",
                                                   "model": {"backbone": "resnet10t", "crop_pct": 1.0}})
    from pipeline import folds
    folds.main(["configs/tiny/competition.yaml"])
    a = prepare(load_experiment("configs/tiny/lenet5.yaml")).images
    b = prepare(load_experiment("configs/tiny/resnet.yaml")).images
    assert a.filename == b.filename and len(list((tiny / "cache").glob("*.npy"))) == 1


def _break(tiny, name, content):
    (tiny / "data/tiny/train" / name).write_bytes(content)


def test_skip_lists_missing_empty_and_corrupt_images(tiny, capsys):
    (tiny / "data/tiny/train/tr0001.png").unlink()
    _break(tiny, "tr1002.png", b"")
    _break(tiny, "tr2003.png", b"\x89PNG\r\n\x1a\n garbage")
    cfg = load_competition("configs/tiny/competition.yaml", ["data.on_bad_image=skip"])
    comp = competition.load_competition_data(cfg)
    assert len(comp.train) == 21 and not comp.train["id"].isin(["tr0001", "tr1002", "tr2003"]).any()
    assert len(comp.skipped) == 3
    for name in ("tr0001", "tr1002.png", "tr2003.png"):
        assert any(name in line for line in comp.skipped)
    assert "tr2003.png" in capsys.readouterr().err
    again = competition.load_competition_data(cfg)  # the decode check is remembered
    assert again.skipped == comp.skipped and list((tiny / "cache").glob("*_bad.json"))


def test_error_mode_names_a_corrupt_file(tiny):
    _break(tiny, "tr2003.png", b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="train.csv: row 21: data/tiny/train/tr2003.png: "
                                        "cannot decode image"):  # before folds do any work
        competition.load_competition_data(load_competition("configs/tiny/competition.yaml"))


def test_error_mode_names_a_missing_file(tiny):
    (tiny / "data/tiny/train/tr0001.png").unlink()
    with pytest.raises(UserError, match="train.csv: row 3: no image file for id 'tr0001'"):
        competition.load_competition_data(load_competition("configs/tiny/competition.yaml"))


RACE = """\
import sys, time
from pathlib import Path
import numpy as np
from pipeline.data import images

folder, me = Path(sys.argv[1]), sys.argv[2]
paths = [str(folder / "img" / f"{i}.png") for i in range(6)]
decode = images.decode

def slow(path, channels=3):  # a slow decoder widens the race; logs who decoded what
    with open(folder / f"decoded_{me}", "a") as log:
        log.write(f"{path}\\n")
    time.sleep(0.03)
    return decode(path, channels)

images.decode = slow
(folder / f"ready_{me}").touch()
while len(list(folder.glob("ready_*"))) < 2:  # start together
    time.sleep(0.001)
bad = images.undecodable(paths + [str(folder / "broken.png")], folder / "cache")
np.save(folder / f"out_{me}.npy", images.image_cache(paths, 16, 3, folder / "cache"))
print(sorted(bad))
"""


def test_processes_building_the_same_cache_at_once_share_one_build(tmp_path):
    """The ranks of a torchrun (or trainings of separate folds) asking for the same cache at the
    same time: one decodes and builds, the other waits on the lock and reads the result; one
    whole cache and one decode record, nothing half-written, every image decoded once each."""
    paths = _png_set(tmp_path / "img", n=6)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "race.py").write_text(RACE)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "race.py", str(tmp_path), me], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == repr([str(tmp_path / "broken.png")])
    decoded = [line for me in ("a", "b") if (tmp_path / f"decoded_{me}").is_file()
               for line in (tmp_path / f"decoded_{me}").read_text().split()]
    assert sorted(decoded) == sorted(paths * 2 + [str(tmp_path / "broken.png")])  # check + cache
    expected = np.stack([images.resize(images.decode(p), 16) for p in paths])
    for me in ("a", "b"):
        np.testing.assert_array_equal(np.load(tmp_path / f"out_{me}.npy"), expected)
    cache = tmp_path / "cache"
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*_bad.json"))) == 1
    assert not list(cache.glob(".*.tmp"))
    np.testing.assert_array_equal(np.load(next(cache.glob("*.npy"))), expected)
