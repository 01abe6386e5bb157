"""Token-label alignment (TL-Align, Xiao et al., ICCV'23): carry every token's label through the attention layers.

Each self-attention layer moves the labels Y [B, T, K] of its T tokens as the tokens move:
Y <- (A Y + Y) / 2, with A the softmax attention averaged over heads, taken before attention
dropout and detached. MLP / channel blocks leave labels alone. In a class-attention layer
(CaiT, FAN) only the class token moves: y_cls <- (a_cls [y_cls; Y] + y_cls) / 2.

Nothing is copied from timm: while `TokenLabelAligner.align` is active, forward hooks on each
attention's input projections (`qkv`, or `q` and `k` for class attention) recompute the
head-mean attention under no_grad (timm's fused SDPA never materialises it) and update the
labels on the fly. Outside the context the model has no hooks and runs as before.

    aligner = TokenLabelAligner(model)
    with aligner.align(y0_cls, y0_tokens) as aligned:
        logits = model(images)
    loss = soft_ce(logits, aligned.cls)

Tokens without a label (`valid` False: outside the label map's footprint) enter with a zero row and carry no
label: a mass column, 1 for labelled tokens, travels through the same products, and every traced row is divided
by its mass at the end, so a label is what its token attended to among labelled content.

Because the update does not depend on the labels, Y_L = P Y0 with P = prod_l (I + A_l) / 2.
The aligner picks the cheaper order: "layer" (update Y per layer, ~T^2 K each) or "transport"
(accumulate P, ~T^3 each, then one product), from T, K and the depth.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.models.cait import ClassAttn
from torch import nn

from common.errors import UserError
from core.optim import full_precision

ORDERS = ("auto", "layer", "transport")


@dataclass
class AlignedLabels:
    """Labels after the traced forward pass (set when the `align` context exits).

    cls: [B, K] the image-level target: the class token's label, or the mean of the pooled tokens'
    labels for an average-pooled model. tokens: [B, N, K] the patch tokens' labels.
    """

    cls: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def initial_labels_paper(
        source_map: torch.Tensor,
        image_labels: torch.Tensor,
        cls_label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TL-Align's initial labels after a token-aligned mix: (class row [B, K], patch rows [B, N, K]).

    source_map [B, N]: batch index of the image each patch was cut from. image_labels [B, K]: each
    image's (smoothed) label. Patch rows are their source image's label; the class row is cls_label,
    by default the patches' mean, i.e. the area-mixed label.
    """
    tokens = image_labels[source_map]
    return (tokens.mean(1) if cls_label is None else cls_label), tokens


def alignment_cost(order: str, tokens: int, classes: int, layers: int) -> int:
    """Multiply-adds per sample of the label path over `layers` self-attention layers of `tokens` tokens."""
    if order == "layer":
        return layers * tokens ** 2 * classes
    if order == "transport":
        return max(layers - 1, 0) * tokens ** 3 + tokens ** 2 * classes
    raise ValueError(f"order must be 'layer' or 'transport', got {order!r}")


def choose_order(tokens: int, classes: int, layers: int) -> str:
    """The cheaper accumulation order for this shape."""
    cheaper = alignment_cost("transport", tokens, classes, layers) < alignment_cost("layer", tokens, classes, layers)
    return "transport" if cheaper else "layer"


def mean_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean of softmax(q k^T * scale) for q [B, H, Tq, d], k [B, H, T, d], in float32 or wider: [B, Tq, T]."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with full_precision(q.device.type):
        return ((q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


class _Trace:
    """Label state of one traced forward pass: the labels, or the pending transport of the self-attended rows."""

    def __init__(self, labels: torch.Tensor, skip: int, order: str, num_self: int, num_cls: int):
        self.labels = labels  # [B, R, K]; rows [skip:] take part in self-attention, row 0 in class attention
        self.skip = skip
        self.order = order
        self.todo_self, self.todo_cls = num_self, num_cls
        self.transport: torch.Tensor | None = None
        self.cls_query: torch.Tensor | None = None

    def self_attention(self, attn: torch.Tensor) -> None:
        rows = self.labels[:, self.skip:]
        if attn.shape[0] != rows.shape[0] or attn.shape[-1] != rows.shape[1]:
            raise UserError(
                f"TL-Align: an attention layer sees {attn.shape[0]} images x {attn.shape[-1]} tokens but the labels "
                f"give {rows.shape[0]} x {rows.shape[1]}; build the label maps on the model's patch grid "
                "(and disable patch dropout)")
        if self.todo_self == 0:
            raise RuntimeError("TL-Align: more self-attention layers ran than the model has: "
                               "call the model exactly once inside `align`")
        self.todo_self -= 1
        attn = attn.to(rows.dtype)
        if self.order == "layer":
            self.labels[:, self.skip:] = torch.baddbmm(rows, attn, rows, beta=0.5, alpha=0.5)
        elif self.transport is None:
            attn.diagonal(dim1=-2, dim2=-1).add_(1.0)
            self.transport = attn.mul_(0.5)
        else:
            self.transport = torch.baddbmm(self.transport, attn, self.transport, beta=0.5, alpha=0.5)

    def flush(self) -> None:
        """Apply the accumulated transport to the self-attended rows."""
        if self.transport is not None:
            self.labels[:, self.skip:] = self.transport @ self.labels[:, self.skip:]
            self.transport = None

    def class_query(self, q: torch.Tensor) -> None:
        self.cls_query = q

    def class_attention(self, attn: torch.Tensor) -> None:
        if self.todo_cls == 0 or self.todo_self:
            raise RuntimeError("TL-Align: class attention ran out of turn (before the last self-attention layer, or "
                               "more often than the model has): call the model exactly once inside `align`")
        self.todo_cls -= 1
        self.flush()
        cls = self.labels[:, :1]
        self.labels[:, :1] = torch.baddbmm(cls, attn.to(cls.dtype).unsqueeze(1), self.labels, beta=0.5, alpha=0.5)

    def check_done(self) -> None:
        if self.todo_self or self.todo_cls:
            raise RuntimeError(f"TL-Align: {self.todo_self} self- and {self.todo_cls} class-attention layers did not "
                               "run: call the model's forward (or forward_features / forward_dense) inside `align`")


def _backbone(model: nn.Module) -> nn.Module:
    """The transformer inside `model`: the first module (model itself first) that has `blocks`."""
    for module in model.modules():
        if isinstance(getattr(module, "blocks", None), nn.Sequential | nn.ModuleList):
            return module
    raise UserError(f"TL-Align: {type(model).__name__} has no transformer `blocks`; "
                    "use a timm VisionTransformer / DeiT or a labeler.fan FAN student")


class TokenLabelAligner:
    """TL-Align for a timm VisionTransformer / DeiT or a FAN model (possibly wrapped, e.g. by a dense head).

    Token layout, as the label rows are numbered: the model's prefix tokens (class, register and
    distillation tokens; timm's `num_prefix_tokens`) then the N patches. In a timm ViT every token
    takes part in every self-attention; in FAN the self-attention blocks see the patches only and
    the class token joins for the class-attention blocks.
    """

    def __init__(self, model: nn.Module):
        net = _backbone(model)
        self.self_attns = [self._module(net, "blocks", i, blk, Attention) for i, blk in enumerate(net.blocks)]
        cls_blocks = getattr(net, "cls_attn_blocks", None)
        if cls_blocks is not None:  # FAN: the class token is added after the self-attention blocks
            self.cls_attns = [self._module(net, "cls_attn_blocks", i, b, ClassAttn) for i, b in enumerate(cls_blocks)]
            self.num_prefix, self.skip = 1, 1
        else:
            self.cls_attns = []
            self.num_prefix, self.skip = getattr(net, "num_prefix_tokens", 0), 0
        pool = getattr(net, "global_pool", "token" if self.num_prefix else "avg")
        if pool == "token" and self.num_prefix:
            self.pool_start = None
        elif pool == "avg":
            self.pool_start = 0 if getattr(net, "pool_include_prefix", False) else self.num_prefix
        else:
            raise UserError(f"TL-Align: {type(net).__name__} pools with global_pool={pool!r}; "
                            "only class-token ('token') and average ('avg') pooling have a traced label")

    @staticmethod
    def _module(net: nn.Module, where: str, i: int, block: nn.Module, kind: type) -> nn.Module:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, kind):
            raise UserError(f"TL-Align: {type(net).__name__}.{where}[{i}].attn is {type(attn).__name__}, "
                            f"not timm's {kind.__name__}; TL-Align cannot trace this block")
        return attn

    def order_for(self, num_patches: int, num_classes: int) -> str:
        """The cheaper order for N patches and K classes on this model."""
        return choose_order(num_patches + self.num_prefix - self.skip, num_classes, len(self.self_attns))

    @contextmanager
    def align(
            self,
            y0_cls: torch.Tensor | None,
            y0_tokens: torch.Tensor,
            order: str = "auto",
            valid: torch.Tensor | None = None,
    ) -> Iterator[AlignedLabels]:
        """Trace labels through the one forward pass run inside the context; the result is filled in on exit.

        y0_tokens [B, N, K]: initial patch labels (each row a distribution). y0_cls [B, K] or None:
        the initial label of the class token and any other prefix token, by default the (labelled) patches'
        mean. valid [B, N] or None (all): which patches have a label; the others carry none (module docstring).
        All are detached and moved to the model's device; the results are float32 (or wider), without grad.
        """
        if order not in ORDERS:
            raise UserError(f"TL-Align: order must be one of {', '.join(ORDERS)}, got {order!r}")
        B, N, K = y0_tokens.shape
        if order == "auto":
            order = self.order_for(N, K)
        with torch.no_grad():
            dtype = torch.promote_types(y0_tokens.dtype, torch.float32)
            device = self.self_attns[0].qkv.weight.device
            tokens = y0_tokens.detach().to(device, dtype)
            if valid is not None:  # zero rows for unlabelled tokens, and the mass column
                mass = valid.detach().to(device, dtype).unsqueeze(-1)
                tokens = torch.cat([tokens * mass, mass], dim=-1)
            if y0_cls is None:
                prefix = tokens.mean(1)
            else:
                prefix = y0_cls.detach().to(device, dtype)
                prefix = prefix if valid is None else torch.cat([prefix, prefix.new_ones(B, 1)], dim=-1)
            labels = torch.cat([prefix.unsqueeze(1).expand(B, self.num_prefix, -1), tokens], dim=1)
        trace = _Trace(labels, self.skip, order, len(self.self_attns), len(self.cls_attns))
        result = AlignedLabels()
        handles = self._register(trace)
        try:
            yield result
        finally:
            for handle in handles:
                handle.remove()
        trace.check_done()
        trace.flush()
        start, labels = self.pool_start, trace.labels
        result.tokens = labels[:, self.num_prefix:]
        result.cls = labels[:, 0] if start is None else labels[:, start:].mean(1)
        if valid is not None:
            result.tokens, result.cls = _per_mass(result.tokens), _per_mass(result.cls)

    def _register(self, trace: _Trace) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for attn in self.self_attns:
            handles.append(attn.qkv.register_forward_hook(_self_attention_hook(attn, trace)))
        for attn in self.cls_attns:
            handles.append(attn.q.register_forward_hook(lambda m, args, q: trace.class_query(q.detach())))
            handles.append(attn.k.register_forward_hook(_class_attention_hook(attn, trace)))
        return handles


def _per_mass(rows: torch.Tensor) -> torch.Tensor:
    """Labels [..., K] from traced rows [..., K + 1] (labels, then mass): labels / mass; 0 where the mass is 0
    (a row that attended to no labelled token has all-zero labels too)."""
    return rows[..., :-1] / rows[..., -1:].clamp(min=torch.finfo(rows.dtype).tiny)


def _self_attention_hook(attn: Attention, trace: _Trace):
    """Forward hook on timm Attention.qkv: recompute the head-mean attention from the projections."""

    @torch.no_grad()
    def hook(module: nn.Module, args: tuple, qkv: torch.Tensor) -> None:
        B, T, _ = qkv.shape
        q, k, _ = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        trace.self_attention(mean_attention(attn.q_norm(q), attn.k_norm(k), attn.scale))

    return hook


def _class_attention_hook(attn: ClassAttn, trace: _Trace):
    """Forward hook on CaiT ClassAttn.k: the class query (captured from `q`) against all tokens' keys."""

    @torch.no_grad()
    def hook(module: nn.Module, args: tuple, k: torch.Tensor) -> None:
        if trace.cls_query is None:
            raise RuntimeError("TL-Align: ClassAttn.k ran before ClassAttn.q; this class attention is not CaiT's")
        B, T, C = k.shape
        q = trace.cls_query.reshape(B, attn.num_heads, 1, -1)
        k = k.reshape(B, T, attn.num_heads, -1).transpose(1, 2)
        trace.cls_query = None
        trace.class_attention(mean_attention(q, k, attn.scale).squeeze(1))

    return hook
