"""Stage 1: deterministic k-fold split of the train table -> folds/<comp>.csv (id, fold).

`--check` instead checks the competition before any stage runs (make does, every time): every
config of its folder is validated, and runs/<comp>/{train,test}-data.json hold the hashes of the
train rows and images and of the test images, rewritten only when they change, so make
retrains (train data) or re-predicts (test images) what they affect and nothing else.
"""
from __future__ import annotations

from pipeline.core.config import check_folder, load_competition
from pipeline.core.errors import cli, stage_args
from pipeline.core.splits import write_data_stamps, write_folds


def _check_option(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="validate the folder's configs and write the data's hashes where "
                             "they changed (make runs this first)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml", _check_option)
    cfg = load_competition(args.config, args.overrides)
    if args.check:
        check_folder(args.config, args.overrides)
        write_data_stamps(cfg)
    else:
        write_folds(cfg)


if __name__ == "__main__":
    main()
