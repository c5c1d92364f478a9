"""Stage 5: the blended test predictions -> submissions/<comp>.csv in sample_submission's format
(pipeline.core.submission). Decisions use the ensemble's tuned thresholds (weights.json) where
it chose some. Written atomically, validated by re-reading.
"""
from __future__ import annotations

from pipeline.blending.run import submit
from pipeline.core.config import load_ensemble
from pipeline.core.errors import cli, stage_args


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml")
    submit(load_ensemble(args.config, args.overrides))


if __name__ == "__main__":
    main()
