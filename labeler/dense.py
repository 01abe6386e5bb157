"""Any timm classifier as a token labeler, LV-ViT's way: the classifier applied at every position of its features.

LV-ViT made its NFNet-F6 maps by turning the Linear classifier into a 1x1 convolution over `forward_features`.
`DenseClassifier` does the same for any timm model: a CNN's head (pooling, optional norm, Linear) runs on each
position of its [B, C, H, W] feature map as on a 1x1 map, so a position's logits are what the classifier says of
that position alone; a ViT's `fc_norm` and head run on every patch token. FAN (labeler.fan) has its own dense head.
`build_labeler` gives every labeler the same `forward_dense(x) -> (class logits, token logits [B, N, K], grid)`.
"""

from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.errors import UserError


class DenseClassifier(nn.Module):
    """A timm classifier with `forward_dense`: its own class logits, and its head's logits at every position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(class logits [B, K], per-position logits [B, H*W, K] row-major, (H, W))."""
        features = self.model.forward_features(x)
        if isinstance(self.model, VisionTransformer):
            tokens = self.model.fc_norm(features[:, self.model.num_prefix_tokens:])
            grid = self.model.patch_embed.dynamic_feat_size(x.shape[-2:])
            return self.model.forward_head(features), self.model.head(tokens), tuple(grid)
        if features.dim() != 4:
            raise UserError(f"{type(self.model).__name__}'s features are {list(features.shape)}, neither a CNN map "
                            f"nor ViT tokens; it cannot label positions")
        channels_last = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
        b, h, w, c = features.shape if channels_last else features.permute(0, 2, 3, 1).shape
        positions = (features if channels_last else features.permute(0, 2, 3, 1)).reshape(b * h * w, 1, 1, c)
        positions = positions if channels_last else positions.permute(0, 3, 1, 2)
        dense = self.model.forward_head(positions).view(b, h * w, -1)
        return self.model.forward_head(features), dense, (h, w)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{name}" for name in inner}


def build_labeler(name: str, num_classes: int, pretrained_file: str | Path | None = None, **kwargs) -> nn.Module:
    """timm model `name` with `forward_dense`: FAN as it is, a CNN or ViT classifier wrapped in DenseClassifier.

    `pretrained_file`: a local safetensors file or torch state dict of the model (nothing is downloaded); every
    tensor must fit, except a classifier with another number of classes, which is left untrained. kwargs go to
    timm.create_model (drop_path_rate, ...).
    """
    if not timm.is_model(name):
        raise UserError(f"--model {name}: not a timm model (labelers: FAN {', '.join(timm.list_models('fan_*')[:3])}"
                        f", ..., the demo CNN cnn_demo_s8, or any timm CNN / ViT classifier)")
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    if pretrained_file is not None:
        load_weights(model, Path(pretrained_file))
    return model if callable(getattr(model, "forward_dense", None)) else DenseClassifier(model)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a weights file into `model`, refusing (one line) one that is not this architecture's."""
    if not path.is_file():
        raise UserError(f"--pretrained-file {path}: no such file")
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a file that is not theirs
        raise UserError(f"--pretrained-file {path}: not a safetensors file or torch state dict "
                        f"({type(e).__name__}); pass the model's weights") from None
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = {f"{c}.{p}" for c in ([classifier] if isinstance(classifier, str) else classifier) for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if not (k in heads and k in own and v.shape != own[k].shape)}
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - heads)
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        what = (f"{len(wrong)} tensor(s) of other shapes, e.g. {wrong[0]}" if wrong else
                f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else
                f"{len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[0]}")
        raise UserError(f"--pretrained-file {path}: not weights of {type(model).__name__} as built here ({what}); "
                        f"pass the weights of this very architecture")
    model.load_state_dict(state, strict=False)
