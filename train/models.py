"""Student models for token-label training: timm ViT/DeiT, timm VOLO and FAN, each with a dense per-token head and MixToken.

Supported families (the timm class decides, not the name):
- ViT/DeiT: any timm `VisionTransformer` (`vit_*`, `deit_*`, `deit3_*`, hybrids). A new Linear head maps every patch
  token of `forward_features` (prefix tokens dropped, then `fc_norm`, which is the identity unless the model pools
  with `global_pool="avg"`) to K logits. `patch_size` and `img_size` may be overridden, e.g.
  `build_student("vit_tiny_patch16_224", 10, 64, patch_size=8)`.
- VOLO: timm `VOLO` (`volo_d1_224`, ...). Its own `aux_head` is the dense head and `head` gives the class logits
  (timm's `forward_train` returns the normed class feature in training and a broken sum in eval, so it is not used).
  Tokens sit on the stride-16 grid; the patch embedding is on the stride-8 grid, where MixToken boxes are doubled.
- FAN (labeler.fan) and any model with `forward_dense(x) -> (cls_logits, token_logits, grid)` and a `patch_embed`
  returning tokens [B, N, C] (or `(tokens, grid)`) on the token grid.

`Student.forward` is the timm model's own forward (for VOLO that already adds 0.5 x the token max). MixToken
(LV-ViT, train.mixing.mixtoken_forward) mixes the patch-embedding output inside a box given in token units and
un-mixes the token logits with the same box, so token i of sample b always predicts sample b's label at i.
"""

import copy
import difflib

import timm
import torch
from timm.layers import to_2tuple, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.models.volo import VOLO
from torch import nn

import labeler  # noqa: F401  (registers the FAN models with timm)
from common.errors import UserError
from train.mixing import MixInfo, mixtoken_forward

FAMILIES = "timm ViT/DeiT (VisionTransformer), timm VOLO, FAN (labeler.fan) or any model with forward_dense"


class Student(nn.Module):
    """A timm classifier plus what token-label training needs: dense logits, MixToken and the token grid.

    Subclasses set `stride` (pixels per token, (sh, sw)), `embed_layout` (patch_embed output layout) and `_dense`.
    """

    family: str
    embed_layout: str
    stride: tuple[int, int]

    def __init__(self, model: nn.Module, img_size: int | tuple[int, int]):
        super().__init__()
        self.model = model
        self.img_size = to_2tuple(img_size)
        self.num_classes = model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K], exactly the timm model's forward."""
        return self.model(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The timm model's own exclusions (position embeddings, class tokens, ...), under this wrapper's names;
        timm's optimizer factory also spares every bias and norm weight (1-D parameters)."""
        return {f"model.{name}" for name in getattr(self.model, "no_weight_decay", set)()}

    def grid(self, img_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid (h, w) for an input of img_size (default: the size the student was built for)."""
        H, W = to_2tuple(img_size) if img_size is not None else self.img_size
        sh, sw = self.stride
        if H % sh or W % sw:
            raise UserError(f"img_size {H}x{W} is not a multiple of the {self.family} student's stride {sh}x{sw}; "
                            f"pick a size divisible by it")
        return H // sh, W // sw

    def forward_dense(self, x: torch.Tensor, mix: MixInfo | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(class logits [B, K], token logits [B, h*w, K] row-major, (h, w)).

        With a "mixtoken" `mix` (train.mixing.sample_mixtoken): inside mix.box the patch embedding of each sample
        is its partner's (sample B - 1 - b, as train.mixing.MixInfo says), and the token logits are pasted back, so
        they line up with each sample's own token labels; only the class target mixes (train.mixing.apply_mix).
        """
        grid = self.grid(tuple(x.shape[-2:]))
        if mix is None or mix.box is None:
            cls, tokens = self._dense(x)
            return cls, tokens, grid
        if mix.mode != "mixtoken" or tuple(mix.grid) != grid:
            raise ValueError(f"forward_dense mixes tokens only for a mixtoken draw on the grid {grid}, "
                             f"got {mix.mode} on {mix.grid}")
        cls, tokens = mixtoken_forward(self._dense, self.model.patch_embed, self.embed_layout, x, mix)
        return cls, tokens, grid

    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class VitStudent(Student):
    """timm VisionTransformer with a new Linear dense head on its patch tokens."""

    family = "ViT"

    def __init__(self, model: VisionTransformer, img_size: int | tuple[int, int]):
        super().__init__(model, img_size)
        if not isinstance(model.patch_drop, nn.Identity):
            raise UserError("patch_drop_rate > 0 drops tokens, so token labels cannot line up; leave it at 0")
        pe = model.patch_embed
        self.stride = tuple(pe.feat_ratio(as_scalar=False))
        self.embed_layout = "NLC" if pe.flatten else pe.output_fmt.value
        self.dense_head = nn.Linear(model.num_features, model.num_classes)
        trunc_normal_(self.dense_head.weight, std=0.02)
        nn.init.zeros_(self.dense_head.bias)

    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        tokens = self.model.fc_norm(feats[:, self.model.num_prefix_tokens:])
        return self.model.forward_head(feats), self.dense_head(tokens)


class VoloStudent(Student):
    """timm VOLO: class logits from `head` on the class token, token logits from its `aux_head`."""

    family = "VOLO"
    embed_layout = "NCHW"

    def __init__(self, model: VOLO, img_size: int | tuple[int, int]):
        super().__init__(model, img_size)
        if model.aux_head is None or model.post_network is None or model.global_pool != "token":
            raise UserError("VOLO students need use_aux_head=True, class-attention post layers and global_pool='token'"
                            "; drop those overrides")
        reduction = model.feature_info[-1]["reduction"]
        self.stride = (reduction, reduction)

    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.head_drop(self.model.forward_features(x))
        return self.model.head(feats[:, 0]), self.model.aux_head(feats[:, 1:])


class DenseStudent(Student):
    """A model with its own `forward_dense` (FAN): one token per patch-embedding position, tokens [B, N, C]."""

    family = "FAN"
    embed_layout = "NLC"

    def __init__(self, model: nn.Module, img_size: int | tuple[int, int]):
        super().__init__(model, img_size)
        if not isinstance(getattr(model, "patch_embed", None), nn.Module):
            raise UserError(f"{type(model).__name__} has forward_dense but no patch_embed module; "
                            f"students need one for MixToken and the token grid")
        self.stride = _embed_stride(model.patch_embed, model_input_size(model))

    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, tokens, _ = self.model.forward_dense(x)
        return cls, tokens


def _embed_stride(patch_embed: nn.Module, img_size: tuple[int, int]) -> tuple[int, int]:
    """Pixels per token of a [B, N, C] / (tokens, (H, W)) patch embedding, from a shape-only run on the meta device
    at `img_size`, a size it tiles exactly (at another, padded convolutions round the grid and the ratio lies)."""
    probe = copy.deepcopy(patch_embed).to("meta")
    in_chans = next(m for m in probe.modules() if isinstance(m, nn.Conv2d)).in_channels
    out = probe(torch.empty(1, in_chans, *img_size, device="meta"))
    if not isinstance(out, tuple):
        raise UserError(f"{type(patch_embed).__name__} returns no grid; dense students need (tokens, (H, W))")
    H, W = out[1]
    return img_size[0] // H, img_size[1] // W


def model_input_size(model: str | nn.Module) -> tuple[int, int]:
    """The input size (H, W) a timm model or model name is configured for, by its pretrained_cfg (64x64 for the demo
    FANs, a multiple of the model's stride); 224x224 without one."""
    if isinstance(model, str):
        size = timm.models.get_pretrained_cfg_value(model, "input_size") if timm.is_model(model) else None
    else:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(size[-2:]) if size else (224, 224)


def build_student(name: str, num_classes: int, img_size: int | tuple[int, int], **kwargs) -> Student:
    """Create timm model `name` for num_classes and img_size (kwargs such as drop_path_rate, patch_size go to timm)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        close = close or timm.list_models(f"{name.split('_')[0]}*")[:5]
        raise UserError(f"unknown model '{name}'; close names: {', '.join(close) or 'none'} "
                        f"(students: {FAMILIES})")
    if num_classes < 1:
        raise UserError(f"num_classes is {num_classes}; a student needs at least one class")
    try:
        model = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as e:
        opts = ", ".join(f"{k}={v}" for k, v in {"img_size": img_size, **kwargs}.items())
        raise UserError(f"model '{name}' cannot be built with {opts} ({e}); students: {FAMILIES}") from e
    if isinstance(model, VisionTransformer):
        student = VitStudent(model, img_size)
    elif isinstance(model, VOLO):
        student = VoloStudent(model, img_size)
    elif callable(getattr(model, "forward_dense", None)):
        student = DenseStudent(model, img_size)
    else:
        raise UserError(f"model '{name}' is a {type(model).__name__}, not a supported student; use {FAMILIES}")
    student.grid()
    return student
