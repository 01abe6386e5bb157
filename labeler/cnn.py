"""A demo-sized CNN classifier of stride 8, registered in timm (`cnn_demo_s8`): a labeler that sees locally.

Its tokens are centred on their cells (every downsampling is a 2x2 stride-2 convolution, every other convolution
3x3 with padding 1), and each position sees about 40 pixels around it, so a position's logits describe its
neighbourhood rather than the whole image. As a labeler it is wrapped by labeler.dense.DenseClassifier, which
applies its pooled Linear head at every position.
"""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def conv_bn(in_chans: int, out_chans: int, kernel: int) -> nn.Sequential:
    """Conv (3x3 padding 1, or kernel x kernel stride kernel), BatchNorm, GELU."""
    stride, padding = (1, 1) if kernel == 3 else (kernel, 0)
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(out_chans), nn.GELU())


class DemoCNN(nn.Module):
    """Stem 3x3, then per stage a 2x2 stride-2 downsampling and `depths[i]` 3x3 convs; global pool, Linear head."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 192),
                 depths: tuple[int, ...] = (1, 1, 1), drop_rate: float = 0.0, global_pool: str = "avg", **_):
        super().__init__()
        layers = [conv_bn(in_chans, widths[0], 3)]
        for i, depth in enumerate(depths):
            layers.append(conv_bn(widths[i], widths[i + 1], 2))
            layers += [conv_bn(widths[i + 1], widths[i + 1], 3) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"cnn_demo_s8": {
    "url": "", "num_classes": 1000, "input_size": (3, 64, 64), "pool_size": (8, 8), "crop_pct": 1.0,
    "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
    "first_conv": "features.0.0", "classifier": "fc"}})


@register_model
def cnn_demo_s8(pretrained: bool = False, **kwargs) -> DemoCNN:
    """Demo-sized CNN, stride 8 (an 8x8 map at 64x64), widths 32-64-128-192, ~0.5M parameters."""
    return build_model_with_cfg(DemoCNN, "cnn_demo_s8", pretrained, **kwargs)
