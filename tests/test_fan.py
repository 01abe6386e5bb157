"""FAN models: published parameter counts, output shapes at several input sizes, and the layout hooks rely on."""

import pytest
import timm
import torch

import labeler  # noqa: F401  (registers the models)

# Published FAN parameter counts (FAN README, millions) at K=1000. They are for plain FAN, so they are
# compared with the model minus its dense `aux_head` (which adds C*K + K, as STL's FAN-TL does).
PUBLISHED_M = {
    "fan_tiny_12_p16_224": 7.3,
    "fan_small_12_p16_224": 28.0,
    "fan_base_18_p16_224": 54.0,
    "fan_large_24_p16_224": 80.5,
    "fan_tiny_8_p4_hybrid": 7.4,
    "fan_small_12_p4_hybrid": 26.3,
    "fan_base_16_p4_hybrid": 50.4,
    "fan_large_16_p4_hybrid": 76.8,
}
DEMO = ["fan_demo_tiny_p8", "fan_demo_hybrid_p8"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", PUBLISHED_M)
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    assert model.aux_head.weight.shape == (1000, model.num_features)
    plain = _count(model) - _count(model.aux_head)
    assert abs(plain / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.02


@pytest.mark.parametrize("name", DEMO)
def test_demo_models_are_small_and_registered(name):
    assert name in timm.list_models("fan_*demo*")
    model = timm.create_model(name, num_classes=10)
    assert 5e5 < _count(model) < 3e6
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)


@pytest.mark.parametrize("name", DEMO)
@pytest.mark.parametrize("size", [(64, 64), (96, 96), (64, 96)])
def test_demo_output_shapes(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        cls_logits, token_logits, grid = model.forward_dense(x)
        plain = model(x)
    grid_expected = (size[0] // 8, size[1] // 8)
    assert grid == grid_expected
    assert cls_logits.shape == (2, 7)
    assert token_logits.shape == (2, grid_expected[0] * grid_expected[1], 7)
    torch.testing.assert_close(plain, cls_logits)


def test_full_model_at_224_on_meta():
    with torch.device("meta"):
        model = timm.create_model("fan_small_12_p4_hybrid", num_classes=1000).eval()
        cls_logits, token_logits, grid = model.forward_dense(torch.empty(1, 3, 224, 224))
    assert grid == (14, 14)
    assert cls_logits.shape == (1, 1000)
    assert token_logits.shape == (1, 196, 1000)


def test_reset_classifier_replaces_both_heads():
    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model.head.out_features == 3 and model.aux_head.out_features == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("fan_demo_hybrid_p8", num_classes=5, drop_path_rate=0.1)
    cls_logits, token_logits, _ = model.forward_dense(torch.randn(4, 3, 64, 64))
    (cls_logits.sum() + token_logits.mean(1).sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_attention_layout_matches_timm_vit():
    model = timm.create_model("fan_demo_tiny_p8", num_classes=10).eval()
    attn = model.blocks[0].attn
    vit_attn = timm.models.vision_transformer.Attention
    assert isinstance(attn, vit_attn) and attn.num_heads == 4
    assert isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)
    cls_attn = model.cls_attn_blocks[0].attn
    assert isinstance(cls_attn, timm.models.cait.ClassAttn)
    assert len(model.cls_attn_blocks) == 2 and len(model.blocks) == 4
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = tuple(output.shape)
        return hook

    attn.qkv.register_forward_hook(record("qkv"))
    cls_attn.k.register_forward_hook(record("k"))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert seen == {"qkv": (2, 64, 3 * 128), "k": (2, 65, 128)}


def test_patch_embed_hook_can_replace_tokens():
    """A hook on patch_embed sees (tokens [B, N, C], (H, W)) and its return value is what the blocks get."""
    torch.manual_seed(0)
    model = timm.create_model("fan_demo_hybrid_p8", num_classes=10).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = model(x.flip(0))
        handle = model.patch_embed.register_forward_hook(lambda m, i, out: (out[0].flip(0), out[1]))
        hooked = model(x)
        handle.remove()
        tokens, grid = model.patch_embed(x)
    torch.testing.assert_close(hooked, reference)
    assert tokens.shape == (3, 64, 128) and grid == (8, 8)
