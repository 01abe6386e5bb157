"""Students: dense shapes and grids per family, training steps, MixToken alignment, untouched inference, bad names."""

import numpy as np
import pytest
import timm
import torch

from common.errors import UserError
from train.losses import token_label_loss
from train.mixing import MixInfo, sample_mixtoken
from train.models import build_student

K = 5
# (name, img_size, timm kwargs, expected token grid)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", 32, dict(patch_size=4, depth=2), (8, 8)),
    "vit_avg": ("deit_tiny_patch16_224", 48, dict(patch_size=16, depth=2, global_pool="avg", class_token=False), (3, 3)),
    "fan": ("fan_demo_tiny_p8", 64, {}, (8, 8)),
    "fan_hybrid": ("fan_demo_hybrid_p8", 64, {}, (8, 8)),
    "volo": ("volo_d1_224", 64, {}, (4, 4)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def build(key: str):
    name, img, kwargs, grid = FAMILIES[key]
    return build_student(name, K, img, **kwargs), img, grid


@pytest.mark.parametrize("key", FAMILIES)
def test_dense_shapes_and_grid(key):
    student, img, grid = build(key)
    cls, tokens, out_grid = student.forward_dense(torch.randn(2, 3, img, img))
    assert out_grid == grid == student.grid() == student.grid(img)
    assert student.stride == (img // grid[0], img // grid[1])
    assert cls.shape == (2, K)
    assert tokens.shape == (2, grid[0] * grid[1], K)


@pytest.mark.parametrize("key", FAMILIES)
def test_forward_is_the_timm_forward(key):
    name, img, kwargs, _ = FAMILIES[key]
    student, _, grid = build(key)
    x = torch.randn(3, 3, img, img)
    student.forward_dense(x, mix=sample_mixtoken(grid, rng=np.random.default_rng(0)))  # leaves no hook behind
    ref = timm.create_model(name, num_classes=K, img_size=img, **kwargs)
    ref.load_state_dict(student.model.state_dict())
    student.eval()
    ref.eval()
    with torch.no_grad():
        logits = student(x)
        assert torch.equal(logits, ref(x))
        cls, tokens, _ = student.forward_dense(x)
    if key == "volo":  # timm VOLO's inference adds half the best token's logits
        torch.testing.assert_close(logits, cls + 0.5 * tokens.max(1).values)
    else:
        torch.testing.assert_close(logits, cls)


@pytest.mark.parametrize("key", FAMILIES)
def test_few_steps_lower_the_loss(key):
    student, img, grid = build(key)
    x = torch.randn(4, 3, img, img)
    cls_target = torch.randn(4, K).softmax(-1)
    token_target = torch.randn(4, grid[0] * grid[1], K).mul(3).softmax(-1)
    valid = torch.rand(4, grid[0] * grid[1]) > 0.2
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    losses = []
    mix = mixtoken(grid, (1, grid[0], 0, grid[1] // 2))
    for step in range(7):  # MixToken on odd steps; the first and last losses are both unmixed
        cls, tokens, _ = student.forward_dense(x, mix=mix if step % 2 else None)
        loss, _ = token_label_loss(cls, cls_target, tokens, token_target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("key", FAMILIES)
def test_full_box_mixtoken_swaps_images_and_unmixes_tokens(key):
    """A box over the whole grid swaps each image with its partner: the class logits flip, token logits do not."""
    student, img, grid = build(key)
    student.eval()
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        cls, tokens, _ = student.forward_dense(x)
        mixed_cls, mixed_tokens, _ = student.forward_dense(x, mix=mixtoken(grid, (0, grid[0], 0, grid[1])))
    torch.testing.assert_close(mixed_cls, cls.flip(0))
    torch.testing.assert_close(mixed_tokens, tokens)


def mixtoken(grid, box):
    """A MixToken draw with a fixed box (top, bottom, left, right) and its exact lam."""
    lam = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (grid[0] * grid[1])
    return MixInfo("mixtoken", lam, box, grid)


def box_mask(grid, box, scale=1):
    top, bottom, left, right = (v * scale for v in box)
    mask = torch.zeros(grid[0] * scale, grid[1] * scale, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.mark.parametrize("key", ["vit", "vit_avg"])
def test_vit_mixtoken_equals_pixel_cutmix(key):
    """A ViT patchifies without overlap, so mixing embeddings equals mixing pixels with the box times the patch."""
    student, img, grid = build(key)
    student.eval()
    box = (1, 3, 0, 2)
    x = torch.randn(4, 3, img, img)
    patch = box_mask(grid, box).repeat_interleave(img // grid[0], 0).repeat_interleave(img // grid[1], 1)
    with torch.no_grad():
        pix_cls, pix_tokens, _ = student.forward_dense(torch.where(patch, x.flip(0), x))
        cls, tokens, _ = student.forward_dense(x, mix=mixtoken(grid, box))
    torch.testing.assert_close(cls, pix_cls)
    own = torch.where(box_mask(grid, box).flatten()[None, :, None], pix_tokens.flip(0), pix_tokens)
    torch.testing.assert_close(tokens, own)
    assert not torch.allclose(tokens, pix_tokens)


@pytest.mark.parametrize("key,first_block,scale", [
    ("fan", lambda m: m.blocks[0], 1),
    ("fan_hybrid", lambda m: m.blocks[0], 1),
    ("volo", lambda m: m.network[0], 2),  # VOLO embeds on a grid twice as fine as its tokens
])
def test_mixtoken_mixes_the_patch_embedding_inside_the_box(key, first_block, scale):
    student, img, grid = build(key)
    student.eval()
    box = (1, 3, 2, 4)
    seen = []
    first_block(student.model).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        student.forward_dense(x)
        student.forward_dense(x, mix=mixtoken(grid, box))
    plain, mixed = (s.reshape(3, grid[0] * scale, grid[1] * scale, -1) for s in seen)
    expected = torch.where(box_mask(grid, box, scale)[None, :, :, None], plain.flip(0), plain)
    torch.testing.assert_close(mixed, expected)


def test_bad_mix_and_size():
    student, img, grid = build("vit")
    x = torch.randn(2, 3, img, img)
    with pytest.raises(ValueError, match="mixtoken"):
        student.forward_dense(x, mix=MixInfo("cutmix", 0.5, (0, 2, 0, 2), grid))
    with pytest.raises(ValueError, match="grid"):
        student.forward_dense(x, mix=mixtoken((4, 4), (0, 2, 0, 2)))
    with pytest.raises(UserError, match="stride"):
        student.grid(img + 2)


@pytest.mark.parametrize("name,needle", [
    ("vit_tiny_patch16_22", "vit_tiny_patch16_224"),
    ("volo_d9_224", "volo_d1_224"),
    ("resnet18", "students"),
])
def test_bad_model_names_give_one_line(name, needle):
    with pytest.raises(UserError) as e:
        build_student(name, K, 32)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
