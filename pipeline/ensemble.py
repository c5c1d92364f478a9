"""Stage 4: blend experiments with optuna-tuned simplex weights -> runs/<comp>/<ensemble>/.

Reads each experiment's oof_tta.csv, test.csv and scores.json and refuses, naming the
experiments, to blend OOF built on different fold files, ids or class orders. Writes:
  weights.json   the weights and mode used, and every score below;
  test.csv       the blended test probabilities (the submit stage formats them);
  report.md      in-sample tuned vs nested-CV tuned vs equal weights vs the best single model,
                 the weights, history.png (optimisation history), folds.png (per-fold scores);
  study.db       the optuna study: `optuna-dashboard sqlite:///runs/<comp>/ensemble/study.db`.

When the tuned weights do not beat equal weights under nested CV the stage says so and, with
`fallback_to_equal` (the default), uses equal weights (in the `mean` mode when `mode: tune`).

Determinism: by default every run tunes a fresh study seeded by `seed` (in memory, then saved
to study.db through a temporary file), so the same inputs give byte-identical weights.json and
test.csv. With `storage: <optuna database URL>` the study `<comp>-<ensemble>` lives there and
persists: a rerun reuses its trials, and several workers may run this stage at once on it,
stopping together at `trials`. Their sampling is then unseeded (seeded workers would propose
the same trials), so results depend on the interleaving; each worker writes the artifacts from
the best trial it sees, so rerun the stage once after the last worker has finished.
"""
from __future__ import annotations

from pipeline.blending.run import run_ensemble
from pipeline.core.config import load_ensemble
from pipeline.core.errors import cli, stage_args


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml")
    run_ensemble(load_ensemble(args.config, args.overrides))


if __name__ == "__main__":
    main()
