"""Every experiment of a competition and every kept past version, side by side, sorted by CV.

Reads runs/<comp>/<exp>/{scores,config,provenance}.json, the same files of each past version
under history/<tag>/, and the ensembles' weights.json; writes runs/<comp>/leaderboard.md and
leaderboard.csv and prints the table.

    python -m pipeline.leaderboard configs/<comp>/competition.yaml
"""
from __future__ import annotations

import sys

from pipeline.core import layout
from pipeline.core.config import load_competition
from pipeline.core.errors import cli, stage_args
from pipeline.reports.leaderboard import build


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml")
    cfg = load_competition(args.config, args.overrides)
    _, md = build(cfg)
    print(md)
    md_path, csv_path = layout.leaderboard_files(cfg.name)
    print(f"wrote {md_path} and {csv_path.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
