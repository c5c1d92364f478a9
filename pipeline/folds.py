"""Stage 1: deterministic k-fold split of the train table -> folds/<comp>.csv (id, fold)."""
from __future__ import annotations

from pipeline.core.config import load_competition
from pipeline.core.errors import cli, stage_args
from pipeline.core.splits import write_folds


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml")
    write_folds(load_competition(args.config, args.overrides))


if __name__ == "__main__":
    main()
