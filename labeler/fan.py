"""FAN and FAN-Hybrid vision transformers (Zhou et al., ICML'22) with STL's dense per-patch head, registered in timm.

Importing this module registers the models, so `timm.create_model("fan_small_12_p4_hybrid", num_classes=K)` works.

Layout (what hooks and other modules may rely on):
- `model.patch_embed(x)` returns `(tokens [B, N, C], (H, W))`; N = H * W in row-major order. A forward hook
  on it may return a replacement `(tokens, (H, W))` tuple: that is where MixToken mixes tokens, before the
  Fourier positional encoding is added.
- `model.blocks[i].attn` is timm's `vision_transformer.Attention` (fused `qkv`, `num_heads`, `scale`, `q_norm`,
  `k_norm`, `attn_drop`, `proj`, `fused_attn`), so a hook on `.attn.qkv` sees the same [B, N, 3C] tensor as in a
  timm ViT (no class token: FAN adds it only after the FAN blocks).
- `model.cls_attn_blocks[i].attn` is timm's CaiT `ClassAttn` (`q`, `k`, `v`, `num_heads`, `scale`), input
  [B, 1 + N, C] with the class token first.
- `model(x)` gives class-token logits [B, K]; `model.forward_dense(x)` also gives the per-patch logits
  [B, N, K] of the Linear `aux_head` on every patch token after the final norm, and the grid (H, W).
"""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtStage
from timm.models.xcit import LPI, ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier
from torch import nn


class DWConvMlp(nn.Module):
    """FAN's value MLP: fc1, a gated residual depthwise-conv branch over the token grid, fc2.

    As in the released FAN code the only non-linearity is the GELU inside the depthwise branch
    (dw3x3 -> GELU -> BN -> dw3x3, timm's `LPI`).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = LPI(hidden_dim)
        self.gamma = nn.Parameter(torch.ones(hidden_dim))
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        x = x + self.drop(self.gamma * self.dwconv(x, H, W))
        return self.drop(self.fc2(x))


class ChannelProcessing(nn.Module):
    """FAN's attentional channel processing, in place of the MLP: a per-channel sigmoid gate times an MLP of the tokens.

    Per head, q = Linear(x) and k = x are softmaxed over tokens; k is averaged over the head's channels, and
    gate[c] = sigmoid(sum_n q[n, c] * k[n]) * temperature. The value is LayerNorm(DWConvMlp(x)).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.mlp_v = DWConvMlp(dim, int(dim * mlp_ratio), drop)
        self.norm_v = norm_layer(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).softmax(dim=1)
        k = x.reshape(B, N, self.num_heads, -1).softmax(dim=1).mean(dim=-1)
        gate = torch.einsum("bnhc,bnh->bhc", q, k).sigmoid() * self.temperature
        gate = self.attn_drop(gate).reshape(B, 1, C)
        return gate * self.norm_v(self.mlp_v(x, H, W))


class FANBlock(nn.Module):
    """Token self-attention then channel processing, each pre-norm with LayerScale and drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, eta: float = 1.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = ChannelProcessing(dim, num_heads, mlp_ratio, qkv_bias, attn_drop, proj_drop, norm_layer)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))


class ConvNeXtEmbed(nn.Module):
    """FAN-Hybrid's patch embedding: a ConvNeXt stem and stages (timm's), then a strided conv to the transformer width.

    The first stage keeps the stem's resolution, each later one halves it; total stride is
    stem_stride * 2 ** (len(depths) - 1) * proj_stride. Returns (tokens [B, N, C], (H, W)).
    `ls_init_value` is the blocks' initial LayerScale (ConvNeXt's 1e-6 starts each block near identity).
    """

    def __init__(self, in_chans: int, embed_dim: int, depths: tuple[int, ...] = (3, 3),
                 dims: tuple[int, ...] = (128, 256), stem_stride: int = 4, proj_stride: int = 2,
                 ls_init_value: float = 1e-6, norm_layer: type[nn.Module] = LayerNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], stem_stride, stem_stride), norm_layer(dims[0]))
        self.stages = nn.Sequential(*(
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], stride=1 if i == 0 else 2, depth=depth,
                          ls_init_value=ls_init_value, conv_mlp=True, norm_layer=norm_layer)
            for i, depth in enumerate(depths)))
        self.proj = nn.Conv2d(dims[-1], embed_dim, proj_stride, proj_stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.stages(self.stem(x)))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class FAN(nn.Module):
    """Fully Attentional Network with a class-token head and a dense per-patch head (`aux_head`, STL's FAN-TL).

    `convnext=None` gives FAN-ViT (3x3 stride-2 conv+BN+GELU patch embedding, `patch_size` 8 or 16); a dict of
    `ConvNeXtEmbed` arguments gives FAN-Hybrid. Any input whose sides are multiples of the total stride works:
    the Fourier positional encoding is computed for the grid the input gives.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, cls_attn_layers: int = 2,
                 eta: float = 1.0, tokens_norm: bool = True, convnext: dict | None = None,
                 head_init_scale: float = 1.0, global_pool: str = "token"):
        super().__init__()
        assert global_pool == "token", "FAN classifies from its class token only"
        norm_layer = nn.LayerNorm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        if convnext is None:
            self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = ConvNeXtEmbed(in_chans, embed_dim, **convnext)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        # drop-path is constant over the FAN blocks (not a linear ramp), as in FAN
        self.blocks = nn.ModuleList(
            FANBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, drop_path_rate,
                     norm_layer, eta)
            for _ in range(depth))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate,
                                norm_layer=norm_layer, eta=eta, tokens_norm=tokens_norm)
            for _ in range(cls_attn_layers))
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.aux_head = None
        self.reset_classifier(num_classes)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)
        if num_classes > 0:
            for p in self.head.parameters():
                p.data.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "*.temperature"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class-token and dense heads for `num_classes` (0 removes both)."""
        assert global_pool in (None, "token"), "FAN classifies from its class token only"
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised tokens [B, 1 + N, C] (class token first) and the patch grid (H, W)."""
        x, (H, W) = self.patch_embed(x)
        x = self.pos_drop(x + self.pos_embed(1, H, W).flatten(2).transpose(1, 2))
        for blk in self.blocks:
            x = blk(x, H, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x), (H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(class logits [B, K], per-patch logits [B, N, K], grid (H, W)); patch n sits at row n // W, column n % W."""
        x, grid = self.forward_tokens(x)
        return self.forward_head(x), self.aux_head(x[:, 1:]), grid


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.0", "classifier": ("head", "aux_head"), **kwargs,
    }


_HYBRID = {"first_conv": "patch_embed.stem.0"}
_DEMO = {"input_size": (3, 64, 64)}
default_cfgs = generate_default_cfgs({
    "fan_tiny_12_p16_224": _cfg(),
    "fan_small_12_p16_224": _cfg(),
    "fan_base_18_p16_224": _cfg(),
    "fan_large_24_p16_224": _cfg(),
    "fan_tiny_8_p4_hybrid": _cfg(**_HYBRID),
    "fan_small_12_p4_hybrid": _cfg(**_HYBRID),
    "fan_base_16_p4_hybrid": _cfg(**_HYBRID),
    "fan_large_16_p4_hybrid": _cfg(**_HYBRID),
    "fan_demo_tiny_p8": _cfg(**_DEMO),
    "fan_demo_hybrid_p8": _cfg(**_DEMO, **_HYBRID),
})


def _create_fan(variant: str, pretrained: bool, model_args: dict, **kwargs) -> FAN:
    """Build a registered variant; keyword arguments override its architecture arguments, as in timm."""
    return build_model_with_cfg(FAN, variant, pretrained, **dict(model_args, **kwargs))


def _hybrid_args(embed_dim: int, depth: int, num_heads: int, convnext_depths: tuple[int, int] = (3, 3)) -> dict:
    convnext = {"depths": convnext_depths, "dims": (128, 256), "stem_stride": 4, "proj_stride": 2}
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, convnext=convnext)


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=4)
    return _create_fan("fan_tiny_12_p16_224", pretrained, model_args, **kwargs)


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8)
    return _create_fan("fan_small_12_p16_224", pretrained, model_args, **kwargs)


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    model_args = dict(patch_size=16, embed_dim=448, depth=18, num_heads=8)
    return _create_fan("fan_base_18_p16_224", pretrained, model_args, **kwargs)


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    model_args = dict(patch_size=16, embed_dim=480, depth=24, num_heads=10)
    return _create_fan("fan_large_24_p16_224", pretrained, model_args, **kwargs)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    return _create_fan("fan_tiny_8_p4_hybrid", pretrained, _hybrid_args(192, 8, 8), **kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """Ten FAN blocks despite the name, as in the released model."""
    return _create_fan("fan_small_12_p4_hybrid", pretrained, _hybrid_args(384, 10, 8), **kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    return _create_fan("fan_base_16_p4_hybrid", pretrained, _hybrid_args(448, 16, 8), **kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """22 FAN blocks and a 3+5-block ConvNeXt despite the name, as in the released model."""
    model_args = dict(_hybrid_args(480, 22, 10, convnext_depths=(3, 5)), head_init_scale=0.001)
    return _create_fan("fan_large_16_p4_hybrid", pretrained, model_args, **kwargs)


@register_model
def fan_demo_tiny_p8(pretrained: bool = False, **kwargs) -> FAN:
    """Demo-sized FAN-ViT: stride 8 (an 8x8 grid at 64x64), width 128, 4 FAN blocks with MLP ratio 2."""
    model_args = dict(patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)
    return _create_fan("fan_demo_tiny_p8", pretrained, model_args, **kwargs)


@register_model
def fan_demo_hybrid_p8(pretrained: bool = False, **kwargs) -> FAN:
    """Demo-sized FAN-Hybrid: 4x4 stem and two ConvNeXt blocks of 64 at stride 4, stride 8 in all, 4 FAN blocks of 128.

    Unlike FAN-Hybrid its ConvNeXt part uses BatchNorm and LayerScale 1: trained from scratch on the small demo
    set, the LayerNorm version stayed at chance for 4 epochs where this one reached 85% in 9.
    """
    convnext = dict(depths=(2,), dims=(64,), stem_stride=4, proj_stride=2, ls_init_value=1.0, norm_layer=nn.BatchNorm2d)
    model_args = dict(embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, convnext=convnext)
    return _create_fan("fan_demo_hybrid_p8", pretrained, model_args, **kwargs)
