"""Write a submission from a package alone: no train images, configs, runs or internet.

    python -m pipeline.infer PACKAGE --test-images DIR --sample-submission FILE --out FILE
    python -m pipeline.infer PACKAGE --config configs/<comp>/competition.yaml --out FILE

Checks every file of the package against its manifest, finds every test image, then streams
them (decode, resize, TTA views, every fold model, blend) a batch at a time, on the GPU when
one is visible (pipeline.packaging.reader). With the package's settings on CPU the submission
is byte-identical to `make submit`'s on the same test set. `--estimate N` prints how long N
test images would take with this package on this machine, measured on a sample, and writes
nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.core import tasks, thresholds
from pipeline.core.competition import find_images
from pipeline.core.config import load_competition
from pipeline.core.errors import cli
from pipeline.core.submission import format_submission, write_submission
from pipeline.packaging.reader import (Timing, blended, estimate, load_package, predict_package,
                                       read_sample)
from pipeline.runtime.device import Runtime, resolve_device


def inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(test image folder, sample submission): as given, else the competition config's."""
    if args.config is None:
        return Path(args.test_images), Path(args.sample_submission)
    data = load_competition(args.config).data
    return (Path(args.test_images or data.path("test_images")),
            Path(args.sample_submission or data.path("sample_submission")))


def run(args: argparse.Namespace) -> None:
    on = resolve_device("auto")
    Runtime.on(on).keep_freed_memory()  # as the predict stage does
    checked = time.perf_counter()
    pkg = load_package(Path(args.package), args.max_batch)
    test_images, sample_path = inputs(args)
    fmt = read_sample(sample_path, pkg)
    ids = pd.Series(fmt.ids).str.strip()
    paths = find_images(ids, test_images, pkg.meta["image_suffix"], sample_path)
    checked = time.perf_counter() - checked
    if args.estimate is not None:
        print(estimate(pkg, paths, args.estimate, on), file=sys.stderr)
        return
    timing = Timing()
    with tqdm(total=len(paths) * len(pkg.specs), unit="img", desc="infer", file=sys.stderr,
              mininterval=1.0, disable=None) as bar:  # no bar in logs
        per_experiment = predict_package(pkg, paths, on, timing, bar)
    task = tasks.from_json(pkg.meta["task_spec"])
    df = format_submission(fmt, task, list(ids), blended(pkg, per_experiment),
                           thresholds.from_json(pkg.meta.get("thresholds")))
    write_submission(df, Path(args.out), fmt, task)
    seconds = timing.load_s + timing.predict_s
    print(f"wrote {args.out}: {len(df)} rows; {len(paths)} images in {seconds:.1f} s, "
          f"{len(paths) / seconds:.1f} images/s on {on.type} ({len(pkg.specs)} experiments; "
          f"package checked in {checked:.1f} s)", file=sys.stderr)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", help="package folder (make package)")
    parser.add_argument("--test-images", help="folder of the test images")
    parser.add_argument("--sample-submission",
                        help="sample_submission.csv: the test ids, their order and the layout")
    parser.add_argument("--config", help="a competition.yaml whose data paths are the defaults "
                                         "of --test-images and --sample-submission (make infer)")
    parser.add_argument("--out", help="submission CSV to write (required unless --estimate)")
    parser.add_argument("--estimate", type=int, metavar="N",
                        help="print how long N test images would take; write nothing")
    parser.add_argument("--max-batch", type=int, metavar="V",
                        help="view images per forward pass (default the package's; another "
                             "value may change the last digits)")
    args = parser.parse_args(argv)
    if args.out is None and args.estimate is None:
        parser.error("--out is required (or --estimate N)")
    if args.config is None and (args.test_images is None or args.sample_submission is None):
        parser.error("--test-images and --sample-submission are required (or --config)")
    return args


@cli
def main(argv: list[str] | None = None) -> None:
    run(parse(argv))


if __name__ == "__main__":
    main()
