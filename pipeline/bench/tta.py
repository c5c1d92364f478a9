"""TTA throughput: ten_crop views/s against the same model's plain forward images/s, in one run.

Per demo experiment (configs/digits/*.yaml, models built untrained): the plain pass is the
train stage's evaluation step (normalise a batch of `eval_batch_size` centre crops, forward,
softmax); the TTA pass is the predict stage's step (cut ten views of each cached image,
normalise, forward in passes of `max_batch` views, softmax, merge). After a warm-up the two
run in A-B-B-A order per repetition, so load from other processes hits both alike; as many
repetitions as fit the time budget (3 to 15); the ratio is the median of the per-repetition
ratios. Target: ratio >= 0.90.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.bench import experiment_configs
from pipeline.core.config import load_experiment
from pipeline.data.loader import normalize, to_memory_format
from pipeline.models import tta
from pipeline.models.factory import cache_size, create_model, input_spec
from pipeline.runtime.device import Runtime, runtime

TARGET = 0.90
MIN_REPS, MAX_REPS, BATCHES, WARMUP = 3, 15, 2, 2
BUDGET_S = 45.0  # per experiment, after the warm-up
NUM_CLASSES = 10


def rate(step, batches: int, items_per_batch: int, rt: Runtime) -> float:
    """Items per second over `batches` calls of `step` (its device work included)."""
    start = time.perf_counter()
    for _ in range(batches):
        step()
    rt.synchronize()
    return batches * items_per_batch / (time.perf_counter() - start)


def bench_experiment(path: Path) -> dict:
    cfg = load_experiment(path)
    rt = runtime(cfg.device, cfg.train.precision)
    model = create_model(cfg.model.model_copy(update={"pretrained": False}), NUM_CLASSES,
                         cfg.data.channels)
    model = to_memory_format(model.to(rt.device), cfg.train.channels_last).eval()
    spec = input_spec(model, cfg.model)
    size, side = cfg.image_size, cache_size(cfg.image_size, spec.crop_pct)
    max_batch = cfg.tta.max_batch or cfg.train.eval_batch_size
    n_views = len(tta.VIEW_SETS["ten_crop"])
    gen = torch.Generator().manual_seed(0)
    crops, cached = rt.to_device(
        torch.randint(0, 256, (cfg.train.eval_batch_size, cfg.data.channels, size, size),
                      dtype=torch.uint8, generator=gen),
        torch.randint(0, 256, (max(1, max_batch // n_views), cfg.data.channels, side, side),
                      dtype=torch.uint8, generator=gen))
    prep = functools.partial(normalize, spec=spec, channels_last=cfg.train.channels_last)

    def plain() -> None:
        F.softmax(model(prep(crops)).float(), dim=1)

    def ten_crop() -> None:
        tta.predict_sets(model, cached, size, ["ten_crop"], "mean", prep, max_batch)

    plain_rates, view_rates = [], []
    with torch.inference_mode(), rt.autocast():
        rate(plain, WARMUP, len(crops), rt)
        rate(ten_crop, WARMUP, len(cached) * n_views, rt)
        start = time.perf_counter()
        while len(plain_rates) < MIN_REPS or (len(plain_rates) < MAX_REPS
                                              and time.perf_counter() - start < BUDGET_S):
            a1 = rate(plain, BATCHES, len(crops), rt)
            view_rates.append(rate(ten_crop, 2 * BATCHES, len(cached) * n_views, rt))
            plain_rates.append((a1 + rate(plain, BATCHES, len(crops), rt)) / 2)
    ratios = [v / p for v, p in zip(view_rates, plain_rates)]
    return dict(experiment=cfg.experiment, side=side, size=size, reps=len(ratios),
                images_s=statistics.median(plain_rates), views_s=statistics.median(view_rates),
                ratio=statistics.median(ratios))


def main() -> list[dict]:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"TTA throughput: ten_crop views/s vs plain images/s, target ratio >= {TARGET:.2f} "
          f"(CPU: {os.cpu_count()} cores, load average {load}, torch {torch.get_num_threads()} "
          f"threads)")
    results = []
    for path in experiment_configs():
        r = bench_experiment(path)
        verdict = "ok" if r["ratio"] >= TARGET else "BELOW TARGET"
        print(f"  {r['experiment']:<12} {r['side']}->{r['size']} px  plain {r['images_s']:9.0f} "
              f"img/s  ten_crop {r['views_s']:9.0f} views/s  ratio {r['ratio']:.3f} "
              f"(median of {r['reps']})  {verdict}")
        results.append(r)
    return results


if __name__ == "__main__":
    main()
