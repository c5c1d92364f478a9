"""`make preview EXP=configs/<comp>/<exp>.yaml`: a PNG grid of original vs augmented samples.

One row per sampled training image: the evaluation view (centre crop), then what the training
data path makes of it in successive epochs, then (when configured) the same batch after
mixup/cutmix. Written to runs/<comp>/<exp>/preview.png; the path is printed.
"""
from __future__ import annotations

from pipeline.core.config import load_experiment
from pipeline.core.errors import cli, stage_args
from pipeline.reports.preview import write_preview


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml")
    print(write_preview(load_experiment(args.config, args.overrides)))


if __name__ == "__main__":
    main()
