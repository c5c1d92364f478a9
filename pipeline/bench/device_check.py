"""The device check (`make bench DEVICE=cuda`): does the data path keep a GPU busy?

On a competition of real photographs (random crops of scikit-image's sample photos, one class
per photo), for resnet50 and efficientnet_b0 at 224 px with the heavy preset, channels_last
and `train.precision: auto` (bf16 on GPUs that have it): the training stage's images/s
against the same model's step on random batches already on the device (the data path's
ratio, goal >= 0.90), and the TTA ten-crop ratio; then `make demo` on the device. On a CPU
it runs the same code at a small size (32 px, 32 images) and skips the demo, so
tests keep it working.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from skimage import data as samples

from pipeline.bench import data_path, tta
from pipeline.core.artifacts import write_csv, write_text
from pipeline.core.config import load_competition, load_experiment
from pipeline.core.splits import write_folds
from pipeline.runtime.device import resolve_device

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")
MODELS = ("resnet50", "efficientnet_b0")
ROOT = Path("data/photos")
CONFIGS = Path("cache/bench/photos")  # generated, git-ignored; the folder names the competition


def build_photos(root: Path, n_images: int, side: int, seed: int = 0) -> None:
    """`n_images` random crops (a quarter to all of each side) of the sample photos, resized
    to `side`, in Kaggle layout; labelled by photo. Kept when already built at this size."""
    marker = root / "built.txt"
    if marker.is_file() and marker.read_text() == f"{n_images} {side}\n":
        return
    rng = np.random.default_rng(seed)
    photos = [getattr(samples, name)()[..., :3] for name in PHOTOS]
    rows = []
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        label = i % len(photos)
        photo = photos[label]
        h, w = photo.shape[:2]
        ch, cw = (int(rng.uniform(0.25, 1.0) * d) for d in (h, w))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((side, side))
        split = "test" if i % 8 == 7 else "train"
        crop.save(root / split / f"p{i:05d}.jpg", quality=90)
        rows.append(dict(id=f"p{i:05d}", label=PHOTOS[label], split=split))
    table = pd.DataFrame(rows)
    write_csv(table[table["split"] == "train"][["id", "label"]], root / "train.csv")
    write_csv(table[table["split"] == "test"][["id"]].assign(label=PHOTOS[0]),
              root / "sample_submission.csv")
    write_text(f"{n_images} {side}\n", marker)


def write_configs(folder: Path, size: int, batch: int, device: str) -> list[Path]:
    """competition.yaml and one experiment per model, heavy preset, channels_last."""
    folder.mkdir(parents=True, exist_ok=True)
    comp = dict(name="photos", device=device, image_size=size, seed=0, folds=dict(n_splits=4),
                data=dict(root=str(ROOT), image_suffix=".jpg"))
    write_text(yaml.safe_dump(comp), folder / "competition.yaml")
    paths = []
    for model in MODELS:
        exp = dict(competition="competition.yaml", model=dict(backbone=model, crop_pct=0.875),
                   train=dict(batch_size=batch, channels_last=True, precision="auto",
                              eval_batch_size=2 * batch),
                   augment=dict(preset="heavy"), tta=dict(max_batch=2 * batch))
        paths.append(folder / f"{model}.yaml")
        write_text(yaml.safe_dump(exp), paths[-1])
    return paths


def measure(path: Path) -> dict:
    """Data-path and TTA ratios of one experiment (as `make bench` measures them)."""
    cfg = load_experiment(path)
    exp, rows, real, synthetic = data_path.fold_arms(cfg)
    real.rate(1), synthetic.rate(1)  # warm-up (cuDNN picks its kernels)
    real_rates, synth_rates = data_path.interleaved_rates(real, synthetic, 1, data_path.MIN_REPS)
    real.close()
    views = tta.bench_experiment(path)
    return dict(experiment=cfg.experiment, device=exp.rt.describe(), size=cfg.image_size,
                batch=cfg.train.batch_size, real=statistics.median(real_rates),
                synthetic=statistics.median(synth_rates),
                ratio=statistics.median(r / q for r, q in zip(real_rates, synth_rates)),
                tta_ratio=views["ratio"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.device_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-demo", action="store_true", help="skip `make demo` on the device")
    args = parser.parse_args(argv)
    gpu = resolve_device(args.device).type == "cuda"
    size, batch, n_images = (224, 128, 2048) if gpu else (32, 8, 32)
    build_photos(ROOT, n_images, int(size / 0.875))
    configs = write_configs(CONFIGS, size, batch, args.device)
    write_folds(load_competition(configs[0].parent / "competition.yaml"))
    print(f"Device check: {n_images} photos, {size} px, heavy preset, channels_last, "
          f"precision auto; ratio = training stage / the step on random batches on the device "
          f"(goal >= {data_path.TARGET:.2f}); TTA = ten_crop views/s / plain images/s")
    results = []
    for path in configs:
        r = measure(path)
        results.append(r)
        verdict = "ok" if r["ratio"] >= data_path.TARGET else "BELOW TARGET"
        print(f"  {r['experiment']:<16} {r['device']}  batch {r['batch']}  stage "
              f"{r['real']:8.0f} img/s  random {r['synthetic']:8.0f} img/s  ratio "
              f"{r['ratio']:.3f} {verdict}  TTA ten_crop ratio {r['tta_ratio']:.3f}", flush=True)
    if gpu and not args.no_demo:
        subprocess.run(["make", "--no-print-directory", "demo", f"DEVICE={args.device}",
                        f"PY={sys.executable}"], check=True)
    return results


if __name__ == "__main__":
    main()
