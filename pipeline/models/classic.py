"""LeNet-5 and AlexNet, registered in timm's model registry.

Importing this module makes `timm.create_model("lenet5", num_classes=...)` work; both
models offer timm's `group_matcher`, `get_classifier`, `reset_classifier` and
`forward_features`/`forward_head` so the generic fine-tuning code treats them like any
timm model.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model


class _Classic(nn.Module):
    """Shared timm-style interface: features -> pooled -> MLP -> head."""

    def __init__(self, features: nn.Sequential, pool: int, flat_dim: int, hidden: tuple[int, ...],
                 num_classes: int, drop_rate: float):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(pool)
        layers, dim = [], flat_dim
        for width in hidden:
            layers += [nn.Dropout(drop_rate), nn.Linear(dim, width), nn.ReLU(inplace=True)]
            dim = width
        self.pre_logits = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = dim
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Stem, each layer of `features` (one group per index), the MLP; the head is unmatched."""
        return dict(stem=r"^features\.0\.", blocks=[(r"^features\.(\d+)", None),
                                                   (r"^pre_logits", (5000,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LeNet5(_Classic):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling; any input of 12 px or more."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, **_):
        features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        super().__init__(features, 5, 16 * 5 * 5, (120, 84), num_classes, drop_rate)


class AlexNet(_Classic):
    """AlexNet (Krizhevsky et al., 2012), single-tower layout; inputs of 63 px or more."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5, **_):
        features = nn.Sequential(
            nn.Conv2d(in_chans, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        super().__init__(features, 6, 256 * 6 * 6, (4096, 4096), num_classes, drop_rate)


def _cfg(size: int, **kwargs) -> dict:
    return dict(num_classes=1000, input_size=(3, size, size), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="features.0", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs({"lenet5.untrained": _cfg(32), "alexnet.untrained": _cfg(224)})


@register_model
def lenet5(pretrained: bool = False, **kwargs) -> LeNet5:
    return build_model_with_cfg(LeNet5, "lenet5", pretrained, **kwargs)


@register_model
def alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    return build_model_with_cfg(AlexNet, "alexnet", pretrained, **kwargs)
