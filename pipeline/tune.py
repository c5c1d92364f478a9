"""Stage: tune an experiment's hyperparameters with optuna -> runs/<comp>/<exp>/tune/ and
configs/<comp>/<exp>-tuned.yaml.

The search space is the experiment's `tune` section or `<exp>.tune.yaml` beside it (README,
"Tuning"). Trial 0 of a new study is the experiment as written (the base config); each trial
trains the tuning folds through the train stage's `train_fold` in its own folder,
tune/trial_<n>/, reporting the validation score after every epoch so the pruner can stop it
(never within a fold's first `min_epochs` epochs); its objective is the metric on those folds'
held-out rows. Once a trial ends its checkpoints are deleted (`keep: logs`, the default), or its
whole folder (`none`), or nothing (`all`).

The study `<comp>-<exp>` lives in tune/study.db unless `storage` names another database or a
`journal:<file>`; every worker started on it (`make tune` again, on this or another machine)
takes the next trials until `trials` trials are complete or pruned. A killed worker's trial is
marked failed, its folder tidied and its parameters queued again, once: at once by a worker on
the same host, after two minutes without a heartbeat by workers elsewhere; Ctrl-C does the same
for the worker's own trial. Each worker, when it stops, writes from the best trial so far:
best.json, report.md with its plots, and the tuned config, only when the best trial beats the
base config (and its content changed, so make does not retrain it for nothing).
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
