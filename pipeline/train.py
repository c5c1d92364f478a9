"""Stage 2: train one experiment on every fold -> runs/<comp>/<exp>/{fold<k>/, oof.csv, scores.json}.

Per fold: best checkpoint by the competition metric (`best.safetensors`), a last checkpoint
for resume (`last.pt`, removed once the fold is done), a per-epoch log (`log.csv`) and the
fold's OOF rows (`oof.csv`). `--fold K` (repeatable) trains only those folds, e.g. one per
machine or terminal; the run's oof.csv and scores.json are written once every fold is done.
Runs where `device` says; under `torchrun` on several processes (pipeline.runtime.device).
"""
from __future__ import annotations

from pipeline.core.config import load_experiment
from pipeline.core.errors import cli, stage_args
from pipeline.runtime import device
from pipeline.training.kfold import train_experiment


def _options(parser) -> None:
    parser.add_argument("--fold", type=int, action="append", help="train only this fold (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="start a new version even when this one is done or resumable "
                             "(a finished one moves to the history; make's FORCE=1)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/<experiment>.yaml", _options)
    cfg = load_experiment(args.config, args.overrides)
    try:
        train_experiment(cfg, args.fold, args.fresh)
    finally:
        device.close()


if __name__ == "__main__":
    main()
