"""Stage 6: a self-contained inference package for a code competition -> packages/<comp>/.

Holds all that `python -m pipeline.infer` needs and nothing else (pipeline.packaging.build):
each blended experiment's test models' weights (`--half`: float16) and prediction spec, the blend,
the task, classes and submission format, a wheel of this project's code, and manifest.json
with every file's sha256 and the library versions used. A finished package is only ever
replaced by a complete one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core import layout
from pipeline.core.config import load_ensemble
from pipeline.core.errors import cli, stage_args
from pipeline.packaging.build import build, size


def _options(parser) -> None:
    parser.add_argument("--half", action="store_true", help="store the weights in float16")
    parser.add_argument("--out", help="package folder (default packages/<comp>)")


@cli
def main(argv: list[str] | None = None) -> None:
    args = stage_args(argv, __doc__, "configs/<comp>/ensemble.yaml", _options)
    cfg = load_ensemble(args.config, args.overrides)
    out = Path(args.out) if args.out else layout.Package.of(cfg.name).dir
    out = build(cfg, Path(args.config).parent, out, args.half)
    print(f"wrote {out}: {size(out) / 1e6:.2f} MB ({'float16' if args.half else 'float32'} "
          f"weights)", file=sys.stderr)


if __name__ == "__main__":
    main()
