"""The benchmarks run end to end on a tiny competition and report sane ratios (not timed)."""
import threading

import pytest

from conftest import EXPERIMENT, write_yaml
from pipeline import folds
from pipeline.data import loader as data
from pipeline.bench import data_path, tta


@pytest.fixture
def experiment(tiny, monkeypatch):
    monkeypatch.setattr(data_path, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(data_path, "BUDGET_S", 0.0)
    monkeypatch.setattr(tta, "BUDGET_S", 0.0)
    path = tiny / "configs/tiny/exp.yaml"
    write_yaml(path, EXPERIMENT)
    folds.main(["configs/tiny/competition.yaml"])
    return path


@pytest.mark.parametrize("spare_core", [False, True])
def test_data_path_bench_measures_both_arms_and_the_cache(experiment, monkeypatch, spare_core):
    monkeypatch.setattr(data, "spare_core", lambda: spare_core)
    monkeypatch.setattr(data_path, "spare_core", lambda: spare_core)
    load = data_path.load_experiment  # batches of 2: a thread made ahead would block, left running
    monkeypatch.setattr(data_path, "load_experiment",
                        lambda path, overrides: load(path, [*overrides, "train.batch_size=2"]))
    before = set(threading.enumerate())
    r = data_path.bench_experiment(experiment)
    assert (r["experiment"], r["side"], r["preset"], r["reps"]) == ("exp", 16, "light", data_path.MIN_REPS)
    assert r["loader"] == ("thread" if spare_core else "main")
    assert r["real"] > 0 and r["synthetic"] > 0 and r["ratio"] > 0
    assert r["first_epoch_s"] >= r["cache_build_s"] > 0 and r["nhwc_speedup"] > 0
    assert 0 < data_path.per_image_ratio(experiment)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "prefetch"]


def test_tta_bench_compares_ten_crop_views_with_plain_images(experiment):
    r = tta.bench_experiment(experiment)
    assert (r["side"], r["size"], r["reps"]) == (16, 16, tta.MIN_REPS)
    assert r["images_s"] > 0 and r["views_s"] > 0 and r["ratio"] > 0


def test_device_check_runs_small_on_the_cpu(tmp_path, monkeypatch, capsys):
    from pipeline.bench import data_path as dp, device_check

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dp, "MIN_REPS", 1)
    monkeypatch.setattr(tta, "BUDGET_S", 0.0)
    monkeypatch.setattr(tta, "MIN_REPS", 1)
    results = device_check.main(["--device", "cpu"])
    assert [r["experiment"] for r in results] == ["resnet50", "efficientnet_b0"]
    for r in results:
        assert r["size"] == 32 and r["real"] > 0 and r["synthetic"] > 0
        assert r["ratio"] > 0 and r["tta_ratio"] > 0 and r["device"].startswith("cpu")
    train = (tmp_path / "data/photos/train.csv").read_text().splitlines()
    assert train[0] == "id,label" and len(train) == 1 + 28  # 32 photos, every 8th for test
    out = capsys.readouterr().out
    assert "resnet50" in out and "TTA ten_crop ratio" in out
