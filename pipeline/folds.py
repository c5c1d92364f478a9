"""Stage 1: deterministic k-fold split of the train table -> folds/<comp>.csv (id, fold).

`--check` instead checks the competition before any stage runs (make does, every time): every
config of its folder is validated, and runs/<comp>/{train,test}-data.json hold the hashes of the
train rows and images and of the test images, rewritten only when they change, so make
retrains (train data) or re-predicts (test images) what they affect and nothing else.
`--deps FILE` validates the folder and writes the runs each run needs first as make
prerequisites (pipeline.core.dependencies; make rebuilds runs/<comp>/deps.mk when a config
changes).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core import dependencies
from pipeline.core.artifacts import write_text
from pipeline.core.config import check_folder, load_competition
from pipeline.core.errors import cli, stage_args
from pipeline.core.splits import write_data_stamps, write_folds


def _check_option(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="validate the folder's configs and write the data's hashes where "
                             "they changed (make runs this first)")
    parser.add_argument("--deps", type=Path, metavar="FILE",
                        help="validate the folder's configs and write make's prerequisites "
                             "between runs to FILE")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml", _check_option)
    cfg = load_competition(args.config, args.overrides)
    if args.check or args.deps:
        configs = check_folder(args.config, args.overrides)
        dependencies.check_acyclic(configs, Path(args.config).parent)
        if args.deps:
            write_text(dependencies.makefile(cfg.name, configs), args.deps)
        else:
            write_data_stamps(cfg)
    else:
        write_folds(cfg)


if __name__ == "__main__":
    main()
