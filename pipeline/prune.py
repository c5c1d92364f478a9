"""`make prune COMP=c KEEP=n`: keep only the n newest past versions of each experiment
(pipeline.core.history); never a current one. A pruned version keeps its tuning study
(tune/: optuna's trials cost hours) unless `--studies`. Prints the space left in use.

    python -m pipeline.prune configs/<comp>/competition.yaml --keep 3 [--studies]
"""
from __future__ import annotations

import sys

from pipeline.core import history, layout
from pipeline.core.config import load_competition
from pipeline.core.errors import UserError, cli, stage_args


def _options(parser) -> None:
    parser.add_argument("--keep", type=int, required=True,
                        help="past versions to keep per experiment (0: only the current ones)")
    parser.add_argument("--studies", action="store_true",
                        help="remove the pruned versions' tuning studies (tune/) too")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml", _options)
    if args.keep < 0:
        raise UserError(f"--keep {args.keep}: must be 0 or more")
    comp = load_competition(args.config, args.overrides).name
    removed, kept = history.prune(comp, args.keep, args.studies)
    runs = layout.competition_runs(comp)
    size = sum(f.stat().st_size for f in runs.rglob("*") if f.is_file()) if runs.is_dir() else 0
    studies = (f", kept {len(kept)} past tuning studies (history/<tag>/tune/; --studies removes "
               f"them)" if kept else "")
    print(f"pruned {len(removed)} past versions{studies}; {runs} now holds {size / 2**20:.1f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
