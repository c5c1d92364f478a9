"""Write a submission from a package alone: no train images, configs, runs or internet.

    python -m pipeline.infer PACKAGE --test-images DIR --sample-submission FILE --out FILE

Checks every file of the package against its manifest, finds every test image, then streams
them (decode, resize, TTA views, every fold model, blend) a batch at a time, on the GPU when
one is visible. With the package's settings on CPU the submission is byte-identical to
`make submit`'s on the same test set. `--estimate N` prints how long N test images would take
with this package on this machine, measured on a sample, and writes nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import blend, cpu, inference, tta, tasks, thresholds
from pipeline.artifacts import as_written, sha256
from pipeline.competition import SubmissionFormat, find_images, read_table
from pipeline.device import resolve_device
from pipeline.errors import UserError, cli
from pipeline.images import decode, resize
from pipeline.package import BLEND, MANIFEST, PACKAGE, SETTINGS, versions
from pipeline.submit import format_submission, write_submission

DECODE_THREADS = 4  # PIL and cv2 release the GIL


@dataclass(frozen=True)
class Package:
    root: Path
    meta: dict  # package.json
    blend: dict  # blend.json
    settings: dict[str, inference.Settings]  # per experiment


def verify(root: Path) -> dict:
    """The manifest, once every file it lists is present with its recorded sha256."""
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; PACKAGE must be a folder written by `make package`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rebuild the package") from None
    for name, entry in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise UserError(f"{file}: missing from the package (listed in {MANIFEST}); "
                            f"upload the whole package folder")
        if file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise UserError(f"{file}: differs from the sha256 in {MANIFEST} (changed or "
                            f"corrupt); rebuild the package with `make package`")
    return manifest


def load_package(root: Path, max_batch: int | None = None) -> Package:
    """A verified package; `max_batch` overrides every experiment's views per forward pass."""
    manifest = verify(root)
    built, here = manifest["versions"], versions()
    differ = [f"{k} {built[k]} (here {here[k]})" for k in ("torch", "timm") if built[k] != here[k]]
    if differ:
        print(f"warning: package built with {', '.join(differ)}", file=sys.stderr)
    mix = json.loads((root / BLEND).read_text())
    settings = {}
    for name in mix["experiments"]:
        st = inference.Settings.from_json(json.loads((root / name / SETTINGS).read_text()))
        settings[name] = dataclasses.replace(st, max_batch=max_batch) if max_batch else st
    return Package(root, json.loads((root / PACKAGE).read_text()), mix, settings)


def read_sample(path: Path, pkg: Package) -> SubmissionFormat:
    """The sample submission's ids and order, in the layout the package was built for."""
    sample = read_table(path)
    sub = pkg.meta["submission"]
    if list(sample.columns) != [sub["id_column"], *sub["columns"]]:
        raise UserError(f"{path}: columns {list(sample.columns)} differ from the competition's "
                        f"{[sub['id_column'], *sub['columns']]}")
    ids = sample[sub["id_column"]]
    if ids.empty:
        raise UserError(f"{path}: has no rows")
    dup = ids.str.strip().duplicated()
    if dup.any():
        raise UserError(f"{path}: duplicate id {ids[dup].iloc[0]!r}")
    return SubmissionFormat(sub["id_column"], sub["kind"], tuple(sub["columns"]), tuple(ids),
                            sub["positive_class"], sub.get("binary_columns", False))


def stream(paths: list[str], settings: inference.Settings,
           pool: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
    """uint8 N x C x side x side batches of the decoded, resized images (as the image cache
    holds them), `settings.images_per_batch` at a time."""
    def load(path: str) -> np.ndarray:
        return resize(decode(path, settings.channels), settings.side)

    size = settings.images_per_batch
    for start in range(0, len(paths), size):
        batch = np.stack(list(pool.map(load, paths[start:start + size])))
        yield torch.from_numpy(batch).permute(0, 3, 1, 2)


@dataclass
class Timing:
    load_s: float = 0.0  # reading fold weights
    predict_s: float = 0.0  # decoding, views, models


def predict_package(pkg: Package, paths: list[str], on: torch.device,
                    timing: Timing, bar: tqdm | None = None) -> list[np.ndarray]:
    """Each experiment's test probabilities, averaged over its folds (rows in `paths` order)."""
    out = []
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for name in pkg.blend["experiments"]:
            st = pkg.settings[name]
            started = time.perf_counter()
            models = [inference.load_model(st, pkg.root / name / f"fold{k}.safetensors", on)
                      for k in range(pkg.blend["folds"][name])]
            timing.load_s += time.perf_counter() - started
            started = time.perf_counter()
            batches = stream(paths, st, pool)
            if bar is not None:
                batches = _counted(batches, bar, name)
            views = st.view_sets[0]
            predicted = inference.predict_batches(models, batches, st, inference.runtime(st, on))
            out.append(tta.average_folds(predicted[views]))
            timing.predict_s += time.perf_counter() - started
    return out


def _counted(batches: Iterator[torch.Tensor], bar: tqdm, name: str) -> Iterator[torch.Tensor]:
    bar.set_postfix_str(name)
    for x in batches:
        yield x
        bar.update(len(x))


def blended(pkg: Package, per_experiment: list[np.ndarray]) -> np.ndarray:
    """The blend of the experiments' probabilities, through the same numbers as the stages'
    files: each experiment's as predict writes it, the blend as the ensemble stage writes it."""
    probas = np.stack([as_written(p) for p in per_experiment])
    return as_written(blend.blend(probas, np.asarray(pkg.blend["weights"]), pkg.blend["mode"]))


def estimate(pkg: Package, paths: list[str], n: int, on: torch.device) -> str:
    """How long `n` images would take: the time to load the fold weights, plus `n` times the
    per-image time measured on a sample of one full batch (per image, a smaller batch can take
    twice as long), in a second pass over it (the first warms up the kernels)."""
    sample = paths[:max(st.images_per_batch for st in pkg.settings.values())]
    predict_package(pkg, sample, on, Timing())
    timing = Timing()
    predict_package(pkg, sample, on, timing)
    per_image = timing.predict_s / len(sample)
    total = timing.load_s + n * per_image
    return (f"estimate: {n} images would take about {total:.1f} s ({total / 60:.1f} min) on "
            f"{on.type}: {1 / per_image:.1f} images/s measured on {len(sample)} images, "
            f"{timing.load_s:.1f} s to load the weights")


def run(args: argparse.Namespace) -> None:
    on = resolve_device("auto")
    if on.type == "cpu":
        cpu.reuse_freed_memory()  # as the predict stage does
    checked = time.perf_counter()
    pkg = load_package(Path(args.package), args.max_batch)
    sample_path = Path(args.sample_submission)
    fmt = read_sample(sample_path, pkg)
    ids = pd.Series(fmt.ids).str.strip()
    paths = find_images(ids, Path(args.test_images), pkg.meta["image_suffix"], sample_path)
    checked = time.perf_counter() - checked
    if args.estimate is not None:
        print(estimate(pkg, paths, args.estimate, on), file=sys.stderr)
        return
    timing = Timing()
    with tqdm(total=len(paths) * len(pkg.settings), unit="img", desc="infer", file=sys.stderr,
              mininterval=1.0, disable=None) as bar:  # no bar in logs
        per_experiment = predict_package(pkg, paths, on, timing, bar)
    task = tasks.from_json(pkg.meta["task_spec"])
    df = format_submission(fmt, task, list(ids), blended(pkg, per_experiment),
                           thresholds.from_json(pkg.meta.get("thresholds")))
    write_submission(df, Path(args.out), fmt, task)
    seconds = timing.load_s + timing.predict_s
    print(f"wrote {args.out}: {len(df)} rows; {len(paths)} images in {seconds:.1f} s, "
          f"{len(paths) / seconds:.1f} images/s on {on.type} ({len(pkg.settings)} experiments; "
          f"package checked in {checked:.1f} s)", file=sys.stderr)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", help="package folder (make package)")
    parser.add_argument("--test-images", required=True, help="folder of the test images")
    parser.add_argument("--sample-submission", required=True,
                        help="sample_submission.csv: the test ids, their order and the layout")
    parser.add_argument("--out", help="submission CSV to write (required unless --estimate)")
    parser.add_argument("--estimate", type=int, metavar="N",
                        help="print how long N test images would take; write nothing")
    parser.add_argument("--max-batch", type=int, metavar="V",
                        help="view images per forward pass (default the package's; another "
                             "value may change the last digits)")
    args = parser.parse_args(argv)
    if args.out is None and args.estimate is None:
        parser.error("--out is required (or --estimate N)")
    return args


@cli
def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main()
