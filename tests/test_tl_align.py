"""TL-Align: labels follow the attention, both accumulation orders agree, and the model runs exactly as before."""

import math

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.cait import ClassAttn
from timm.models.vision_transformer import VisionTransformer

from common.errors import UserError
from train.tl_align import TokenLabelAligner, choose_order, initial_labels_paper

K = 5
B = 3
N = 16  # 32x32 input, stride 8


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "fan":
        pytest.importorskip("labeler.fan")
        return timm.create_model("fan_demo_tiny_p8", num_classes=K).eval()
    extra = {
        "vit": {},
        "vit_avg": {"class_token": False, "global_pool": "avg"},
        "vit_qknorm_reg": {"qk_norm": True, "reg_tokens": 2},
    }[kind]
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=K, **extra)
    for p in model.parameters():  # make LayerNorm / qk-norm affine weights non-trivial
        if p.ndim == 1:
            p.data.normal_(1.0, 0.3)
    return model.eval()


def random_labels(classes: int = K, generator_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randn(B, classes, generator=g).softmax(-1), torch.randn(B, N, classes, generator=g).softmax(-1)


def images() -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def self_attns(model) -> list[Attention]:
    return [blk.attn for blk in model.blocks]


def cls_attns(model) -> list[ClassAttn]:
    return [blk.attn for blk in getattr(model, "cls_attn_blocks", [])]


def hook_all(modules, hook) -> list:
    return [m.register_forward_hook(hook) for m in modules]


def set_qk(attn: Attention, q: torch.Tensor | None, k: torch.Tensor | None):
    """A hook on attn.qkv replacing q / k (broadcast to [B, H, T, d]) in its output; v is kept."""

    def hook(module, args, out):
        Bo, T, _ = out.shape
        qkv = out.reshape(Bo, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).clone()
        for i, new in ((0, q), (1, k)):
            if new is not None:
                qkv[i] = new
        return qkv.permute(1, 3, 0, 2, 4).reshape(Bo, T, -1)

    return hook


def reference(model, cls0: torch.Tensor, tok0: torch.Tensor, self_maps, cls_maps):
    """Labels traced by hand from given head-mean attention maps, in float64."""
    fan = hasattr(model, "cls_attn_blocks")
    prefix = 1 if fan else model.num_prefix_tokens
    y = torch.cat([cls0[:, None].expand(-1, prefix, -1), tok0], 1).double()
    skip = 1 if fan else 0
    for a in self_maps:
        rows = y[:, skip:]
        y = torch.cat([y[:, :skip], (a.double() @ rows + rows) / 2], 1)
    for a in cls_maps:
        y[:, 0] = ((a.double()[:, None] @ y)[:, 0] + y[:, 0]) / 2
    return y


@pytest.mark.parametrize("kind", ["vit", "fan"])
def test_outputs_unchanged_and_no_hooks_left(kind):
    model = make_model(kind)
    x = images()
    before = model(x)
    cls0, tok0 = random_labels()
    aligner = TokenLabelAligner(model)
    with aligner.align(cls0, tok0) as aligned:
        during = model(x)
    assert torch.equal(before, during)
    assert aligned.cls.shape == (B, K) and aligned.tokens.shape == (B, N, K)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ZeroDivisionError), aligner.align(cls0, tok0):
        model(x)
        raise ZeroDivisionError
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("kind", ["vit", "vit_qknorm_reg", "fan"])
def test_matches_timm_explicit_attention(kind):
    """The recomputed attention equals timm's own non-fused softmax (captured before attention dropout)."""
    model = make_model(kind)
    captured = {"self": [], "cls": []}
    handles = []
    for key, mods in (("self", self_attns(model)), ("cls", cls_attns(model))):
        for attn in mods:
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(
                lambda m, args, out, key=key: captured[key].append(args[0].mean(1))))
    cls0, tok0 = random_labels()
    with TokenLabelAligner(model).align(cls0, tok0, order="layer") as aligned:
        model(images())
    for h in handles:
        h.remove()
    expected = reference(model, cls0, tok0, captured["self"], [a[:, 0] for a in captured["cls"]])
    assert len(captured["self"]) == len(model.blocks)
    torch.testing.assert_close(aligned.cls.double(), expected[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(aligned.tokens.double(), expected[:, -N:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "fan"])
def test_identity_attention_leaves_labels(kind):
    model = make_model(kind)
    handles = []
    for attn in self_attns(model):
        T = N + model.num_prefix_tokens if kind == "vit" else N
        eye = torch.zeros(T, attn.head_dim)
        eye[:, :T] = 100 * torch.eye(T)  # q_i . k_j * scale = 1250 * delta_ij: softmax is exactly I
        handles += hook_all([attn.qkv], set_qk(attn, eye, eye))
    cls0, tok0 = random_labels()
    with TokenLabelAligner(model).align(cls0, tok0) as aligned:
        model(images())
    for h in handles:
        h.remove()
    assert torch.equal(aligned.tokens, tok0)
    if kind == "vit":
        assert torch.equal(aligned.cls, cls0)


@pytest.mark.parametrize("kind", ["vit", "vit_avg", "fan"])
def test_uniform_attention(kind):
    """Zero queries give uniform attention: every layer averages the labels of all tokens it sees."""
    model = make_model(kind)
    handles = []
    for attn in self_attns(model):
        handles += hook_all([attn.qkv], set_qk(attn, torch.zeros(()), None))
    for attn in cls_attns(model):
        handles += hook_all([attn.q], lambda m, args, out: torch.zeros_like(out))
    cls0, tok0 = random_labels()
    with TokenLabelAligner(model).align(cls0, tok0) as aligned:
        model(images())
    for h in handles:
        h.remove()
    T = N + (model.num_prefix_tokens if kind.startswith("vit") else 0)
    uniform = torch.full((B, T, T), 1 / T)
    expected = reference(model, cls0, tok0, [uniform] * len(model.blocks),
                         [torch.full((B, N + 1), 1 / (N + 1))] * len(cls_attns(model)))
    torch.testing.assert_close(aligned.tokens.double(), expected[:, -N:], atol=1e-6, rtol=0)
    target = expected[:, -N:].mean(1) if kind == "vit_avg" else expected[:, 0]
    torch.testing.assert_close(aligned.cls.double(), target, atol=1e-6, rtol=0)


def test_two_tokens_hand_built():
    """Class token + one patch, two heads: head 0 attends [[.8, .2], [.4, .6]], head 1 uniformly."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=2).eval()
    attn = model.blocks[0].attn
    q = torch.zeros(2, 2, attn.head_dim)
    k = torch.zeros(2, 2, attn.head_dim)
    k[0, 0, 0] = 1.0  # head 0: only the class token has a key component
    q[0, 0, 0] = math.log(4) / attn.scale  # softmax([ln 4, 0]) = [.8, .2]
    q[0, 1, 0] = math.log(2 / 3) / attn.scale  # softmax([ln 2/3, 0]) = [.4, .6]
    handle = attn.qkv.register_forward_hook(set_qk(attn, q, k))
    cls0 = torch.tensor([[0.3, 0.7]])
    tok0 = torch.tensor([[[1.0, 0.0]]])
    with TokenLabelAligner(model).align(cls0, tok0) as aligned:
        model(torch.randn(1, 3, 8, 8))
    handle.remove()
    a = torch.tensor([[0.65, 0.35], [0.45, 0.55]])
    y0 = torch.cat([cls0, tok0[0]])
    expected = (a @ y0 + y0) / 2  # [[.4225, .5775], [.8425, .1575]]
    torch.testing.assert_close(aligned.cls[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(aligned.tokens[0, 0], expected[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "fan"])
@pytest.mark.parametrize("classes", [3, 40])
def test_orders_agree(kind, classes):
    model = make_model(kind)
    cls0, tok0 = random_labels(classes)
    aligner = TokenLabelAligner(model)
    results = {}
    for order in ("layer", "transport", "auto"):
        with aligner.align(cls0, tok0, order=order) as results[order]:
            model(images())
    for order in ("transport", "auto"):
        torch.testing.assert_close(results[order].cls, results["layer"].cls, atol=1e-6, rtol=0)
        torch.testing.assert_close(results[order].tokens, results["layer"].tokens, atol=1e-6, rtol=0)


def test_choose_order():
    assert choose_order(tokens=65, classes=10, layers=12) == "layer"
    assert choose_order(tokens=197, classes=1000, layers=12) == "transport"
    assert choose_order(tokens=17, classes=40, layers=2) == "transport"
    assert choose_order(tokens=17, classes=3, layers=2) == "layer"
    assert choose_order(tokens=197, classes=1000, layers=1) == "layer"  # one layer: the transport is A itself


@pytest.mark.parametrize("kind", ["vit", "fan"])
def test_distributions_without_gradient(kind):
    model = make_model(kind).train()
    cls0, tok0 = random_labels()
    cls0.requires_grad_(True)
    tok0.requires_grad_(True)
    with TokenLabelAligner(model).align(cls0, tok0) as aligned:
        feats = model.forward_features(images())
    assert not aligned.cls.requires_grad and not aligned.tokens.requires_grad
    logits = model.head(feats)
    loss = -(aligned.cls * model.forward_head(feats).log_softmax(-1)).sum(-1).mean()
    loss = loss - (aligned.tokens * logits[:, -N:].log_softmax(-1)).sum(-1).mean()
    loss.backward()
    assert cls0.grad is None and tok0.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    for rows in (aligned.cls, aligned.tokens):
        assert rows.min() >= 0
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=1e-6, rtol=0)


def test_initial_labels_paper():
    source = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    cls, tokens = initial_labels_paper(source, labels)
    assert torch.equal(tokens[1, 3], labels[0]) and torch.equal(tokens[0, 2], labels[1])
    torch.testing.assert_close(cls[0], 0.5 * labels[0] + 0.5 * labels[1])
    torch.testing.assert_close(cls[1], 0.25 * labels[0] + 0.75 * labels[1])
    given = torch.tensor([[1.0, 0.0, 0.0]] * 2)
    assert initial_labels_paper(source, labels, given)[0] is given


def test_misuse_is_reported():
    model = make_model("vit")
    aligner = TokenLabelAligner(model)
    cls0, tok0 = random_labels()
    with pytest.raises(RuntimeError, match="exactly once"), aligner.align(cls0, tok0):
        model(images())
        model(images())
    with pytest.raises(UserError, match="patch grid"), aligner.align(cls0, tok0[:, :9]):
        model(images())
    with pytest.raises(RuntimeError, match="did not run"), aligner.align(cls0, tok0):
        pass
    with pytest.raises(UserError, match="order"), aligner.align(cls0, tok0, order="fast"):
        pass
    map_pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="map")
    with pytest.raises(UserError, match="global_pool"):
        TokenLabelAligner(map_pooled)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["vit", "vit_avg", "fan"])
def test_tokens_without_a_label_carry_none(kind):
    """A quarter of the tokens have no label (outside the map's footprint) and come as the targets give them, as
    smoothed class-0 rows. With `valid` no label mass of theirs reaches the class target or the labelled tokens:
    class 0 keeps exactly its smoothing share. Without it, class 0 takes a visible share."""
    model = make_model(kind)
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(B, N, generator=g) >= 0.25
    classes = torch.where(valid, torch.randint(1, K, (B, N), generator=g), 0)
    eps = 0.1
    smoothed = lambda ids: torch.nn.functional.one_hot(ids, K).float() * (1 - eps) + eps / K  # noqa: E731
    tok0, cls0 = smoothed(classes), smoothed(torch.randint(1, K, (B,), generator=g))
    aligner = TokenLabelAligner(model)
    with aligner.align(cls0, tok0, valid=valid) as aligned:
        model(images())
    for rows in (aligned.cls, aligned.tokens):
        torch.testing.assert_close(rows[..., 0], torch.full(rows.shape[:-1], eps / K), atol=1e-6, rtol=0)
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=1e-6, rtol=0)
    with aligner.align(cls0, tok0) as leaky:
        model(images())
    assert (leaky.cls[:, 0] > eps / K + 0.05).all()
    with aligner.align(cls0, tok0, valid=torch.ones(B, N, dtype=torch.bool)) as all_valid:
        model(images())
    torch.testing.assert_close(all_valid.cls, leaky.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(all_valid.tokens, leaky.tokens, atol=1e-6, rtol=0)
