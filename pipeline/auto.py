"""`make auto COMP=c BUDGET=30m`: from competition.yaml alone to the best submission the budget
allows (pipeline.planning).

Measures the data, the device and each candidate model's speed (pipeline/planning/
candidates.yaml), plans experiments to finish inside the budget, writes each as an ordinary
config (configs/<comp>/auto-*.yaml), trains, predicts, blends and submits after each one, and
plans again with the real times. The budget counts every invocation: a rerun resumes.
Writes runs/<comp>/auto/{state.json, report.md}.
"""
from __future__ import annotations

from pipeline.core.errors import cli, stage_args
from pipeline.planning.execute import Auto, parse_budget
from pipeline.runtime import device


def _options(parser) -> None:
    parser.add_argument("--budget", required=True, help="all invocations' time: 90s, 30m, 2h, 1h30m")
    parser.add_argument("--since", type=float, default=None,
                        help="Unix time the clock starts from (make passes when it began)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/competition.yaml", _options)
    try:
        Auto(args.config, parse_budget(args.budget), args.since, args.overrides).run()
    finally:
        device.close()


if __name__ == "__main__":
    main()
