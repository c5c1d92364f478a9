"""The embedded demo competitions, built from scikit-learn's bundled handwritten digits.

`python -m pipeline.demo build` writes a Kaggle-layout folder to data/digits/ (PNG images
upscaled to 32x32 RGB, train.csv, test images, sample_submission.csv and the held-out
answers in solution.csv, which the pipeline never reads). `python -m pipeline.demo score`
prints the CV score, the held-out accuracy of the submission and its path. `--comp lowdata`:
the low-data competition instead (data/lowdata/: 5% of the images to train on).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.core import layout
from pipeline.core.errors import cli
from pipeline.datasets.digits import TEST_FRACTION, build, held_out_accuracy
from pipeline.reports.ensemble import headline


def report(comp: str) -> None:
    weights = json.loads(layout.Run.of(comp, "ensemble").weights.read_text())
    submission = layout.submission_file(comp)
    acc = held_out_accuracy(submission, Path("data") / comp / "solution.csv")
    print(f"ensemble: {headline(weights)}")
    for name, cv in weights["single_cv"].items():
        print(f"  {name}: CV {cv:.4f}")
    print(f"held-out accuracy: {acc:.4f}")
    print(f"submission: {submission}")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "score"])
    parser.add_argument("--comp", choices=sorted(TEST_FRACTION), default="digits")
    args = parser.parse_args(argv)
    if args.action == "build":
        build(Path("data") / args.comp, test_fraction=TEST_FRACTION[args.comp])
    else:
        report(args.comp)


if __name__ == "__main__":
    main()
