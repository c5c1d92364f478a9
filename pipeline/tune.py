"""Stage: tune an experiment's hyperparameters with optuna -> runs/<comp>/<exp>/tune/ and
configs/<comp>/<exp>-tuned.yaml.

The search space is the experiment's `tune` section or `<exp>.tune.yaml` beside it (README,
"Tuning"). Each trial trains the tuning folds through the train stage's `train_fold` in its own folder,
tune/trial_<n>/, reporting the validation score after every epoch so the pruner can stop it;
its objective is the metric on those folds' held-out rows. Once a trial ends its checkpoints
are deleted (`keep: logs`, the default), or its whole folder (`none`), or nothing (`all`).

The study `<comp>-<exp>` lives in tune/study.db unless `storage` names another database or a
`journal:<file>`; every worker started on it (`make tune` again, on this or another machine)
takes the next trials until `trials` trials are complete or pruned. A killed worker's trial is
marked failed and its parameters queued again: at once by any worker on the same host, through
the storage's heartbeat (databases) by workers elsewhere. Each worker, when it stops, writes
from the best trial so far: best.json, report.md with its plots, and the tuned config (only
when its content changed, so make does not retrain it for nothing).
"""
from __future__ import annotations

from pipeline.core.errors import cli, stage_args
from pipeline.tuning.run import tune_experiment


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml")
    tune_experiment(args.config, args.overrides)


if __name__ == "__main__":
    main()
