"""Stage 3: TTA predictions of every fold model, identically on OOF rows and the test set.

Writes runs/<comp>/<exp>/oof_tta.csv (each fold's model on its validation rows), adds the
TTA CV beside the plain one in scores.json, the experiment's report, and last test.csv (every
fold's model on every test row with the chosen views, averaged over folds: what `infer`
computes from a package). `tta.views: auto` scores each candidate view set on the OOF and
keeps the best; all candidates come from the same pass over the data.
"""
from __future__ import annotations

from pipeline.core.config import load_experiment
from pipeline.core.errors import cli, stage_args
from pipeline.training.prediction import predict_experiment


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml")
    predict_experiment(load_experiment(args.config, args.overrides))


if __name__ == "__main__":
    main()
