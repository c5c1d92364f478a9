"""The benchmarks run end to end on a tiny competition and report sane ratios (not timed)."""
import threading

import pytest

from conftest import EXPERIMENT, write_yaml
from pipeline import data, folds
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
