"""Mixing that keeps token labels right: CutMix on the token grid, Mixup, MixToken boxes."""

import numpy as np
import pytest
import torch

from common.errors import UserError
from train.mixing import Mixer, MixInfo, apply_mix, mix_tokens, sample_mixtoken, token_box
from train.targets import HardTokens

torch.set_num_threads(1)

B, GRID, PATCH = 5, (4, 6), 8


def batch():
    """Images whose pixels hold their batch index, token maps one-hot on it (K = B), random validity."""
    images = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 3, GRID[0] * PATCH,
                                                                               GRID[1] * PATCH).clone()
    tokens = torch.eye(B)[:, :, None, None].expand(B, B, *GRID).clone()
    valid = torch.from_numpy(np.random.default_rng(0).random((B, *GRID)) < 0.7)
    return images, torch.eye(B), tokens, valid


def expected_source(box, partner):
    top, bottom, left, right = box
    src = np.zeros((B, *GRID), dtype=np.int64)
    for b in range(B):
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                src[b, r, c] = partner[b] if top <= r < bottom and left <= c < right else b
    return src


def test_cutmix_pastes_one_token_box_into_pixels_tokens_and_masks():
    images, labels, tokens, valid = batch()
    originals = [t.clone() for t in (images, labels, tokens, valid)]
    mixer = Mixer(GRID, mixup_alpha=0.0, cutmix_alpha=1.0, seed=0)
    partial = 0
    for _ in range(20):
        x, y, t, v, info = mixer(images, labels, tokens, valid)
        assert info.mode == "cutmix"
        top, bottom, left, right = info.box
        assert 0 <= top <= bottom <= GRID[0] and 0 <= left <= right <= GRID[1]
        assert info.lam == 1 - (bottom - top) * (right - left) / (GRID[0] * GRID[1])
        src = expected_source(info.box, [4, 3, 2, 1, 0])
        assert np.array_equal(info.source(B).numpy(), src)
        # pixels: the pixel box is the token box times the patch size
        pixel_src = src.repeat(PATCH, 1).repeat(PATCH, 2)
        assert np.array_equal(x[:, 0].numpy(), pixel_src.astype(np.float32))
        # token targets and validity come from the same source
        assert torch.equal(t, torch.eye(B)[torch.from_numpy(src)].permute(0, 3, 1, 2))
        assert torch.equal(v, valid[torch.from_numpy(src), torch.arange(GRID[0])[:, None], torch.arange(GRID[1])])
        # the class target is the exact share of tokens from each image
        assert torch.allclose(y, t.mean((2, 3)), atol=1e-6)
        if 0 < info.lam < 1:
            partial += 1
            assert torch.allclose(y[0], torch.tensor([info.lam, 0, 0, 0, 1 - info.lam]))
    assert partial > 5
    assert all(torch.equal(a, b) for a, b in zip(originals, (images, labels, tokens, valid)))


def test_mixup_blends_everything_with_one_lam():
    images, labels, tokens, valid = batch()
    x, y, t, v, info = Mixer(GRID, mixup_alpha=0.8, cutmix_alpha=0.0, seed=1)(images, labels, tokens, valid)
    lam = info.lam
    assert info.mode == "mixup" and info.box is None and 0 < lam < 1
    partner = torch.tensor([4, 3, 2, 1, 0])
    assert torch.allclose(x[:, 0, 0, 0], lam * torch.arange(5.0) + (1 - lam) * partner)
    assert torch.allclose(y, lam * torch.eye(5) + (1 - lam) * torch.eye(5)[partner])
    assert torch.allclose(t, (lam * torch.eye(5) + (1 - lam) * torch.eye(5)[partner])[:, :, None, None].expand_as(t))
    assert torch.equal(v, valid & valid[partner])


def test_switching_and_probability():
    modes = lambda mixer: {mixer.sample().mode for _ in range(60)}  # noqa: E731
    assert modes(Mixer(GRID, 0.8, 1.0, switch_prob=1.0, seed=2)) == {"cutmix"}
    assert modes(Mixer(GRID, 0.8, 1.0, switch_prob=0.0, seed=2)) == {"mixup"}
    assert modes(Mixer(GRID, 0.8, 1.0, switch_prob=0.5, seed=2)) == {"mixup", "cutmix"}
    assert modes(Mixer(GRID, 0.8, 1.0, prob=0.0, seed=2)) == {"none"}
    assert modes(Mixer(GRID, 0.8, 1.0, prob=0.5, seed=2)) == {"none", "mixup", "cutmix"}
    assert modes(Mixer(GRID, 0.0, 0.0, seed=2)) == {"none"}


def test_token_box_sizes():
    rng = np.random.default_rng(3)
    assert token_box((14, 14), 1.0, rng)[1] == 1.0
    (top, bottom, left, right), lam = token_box((14, 14), 0.0, rng)  # a full-size box, clipped around its centre
    assert bottom - top >= 7 and right - left >= 7 and lam == 1 - (bottom - top) * (right - left) / 196
    for _ in range(50):
        (top, bottom, left, right), lam = token_box((14, 14), 0.75, rng)
        assert bottom - top <= 7 and right - left <= 7 and lam == 1 - (bottom - top) * (right - left) / 196


def test_mixtoken_round_trip_source_and_targets():
    images, labels, tokens, valid = batch()
    rng = np.random.default_rng(4)
    info = sample_mixtoken(GRID, alpha=1.0, rng=rng)
    assert info.mode == "mixtoken" and 0 < info.lam < 1  # this seed draws a proper box
    n = GRID[0] * GRID[1]
    x = torch.randn(B, 1 + n, 7)
    mixed = mix_tokens(x, info, num_prefix_tokens=1)
    assert torch.equal(mixed[:, 0], x[:, 0])  # the class token is left alone
    src = torch.from_numpy(expected_source(info.box, [4, 3, 2, 1, 0])).flatten(1)
    assert torch.equal(mixed[:, 1:], x[:, 1:][src, torch.arange(n)])
    assert not torch.equal(mixed, x)
    assert torch.equal(mix_tokens(mixed, info, num_prefix_tokens=1), x)  # un-mixing is the same call
    # the token layout [B, N, C] and the map layout [B, C, h, w] mix alike
    as_map = x[:, 1:].transpose(1, 2).unflatten(2, GRID)
    cut = MixInfo("cutmix", info.lam, info.box, info.grid)
    pasted = apply_mix(cut, torch.zeros(B, 3, GRID[0] * PATCH, GRID[1] * PATCH), labels, as_map)[2]
    assert torch.equal(pasted.flatten(2).transpose(1, 2), mixed[:, 1:])
    # the model un-mixes its token outputs, so only the class target mixes
    x2, y2, t2, v2 = apply_mix(info, images, labels, tokens, valid)
    assert x2 is images and t2 is tokens and v2 is valid
    assert torch.allclose(y2, info.lam * labels + (1 - info.lam) * labels.flip(0))
    assert info.lam == 1 - (info.box[1] - info.box[0]) * (info.box[3] - info.box[2]) / n


def test_no_mix_passes_through_and_bad_sizes_are_refused():
    images, labels, tokens, valid = batch()
    none = MixInfo("none", 1.0, None, GRID)
    out = apply_mix(none, images, labels, tokens, valid)
    assert all(a is b for a, b in zip(out, (images, labels, tokens, valid)))
    cut = MixInfo("cutmix", 0.5, (0, 2, 0, 3), GRID)
    with pytest.raises(UserError, match="token grid"):
        apply_mix(cut, torch.zeros(B, 3, 33, 48), labels)


@pytest.mark.parametrize("mode", ["cutmix", "mixup", "mixtoken"])
def test_hard_targets_mix_as_their_dense_form(mode):
    """Class ids (HardTokens) go through every mix exactly as the smoothed one-hot maps they stand for."""
    images, labels, _, valid = batch()
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 7, (B, *GRID)))
    hard = HardTokens.of(ids, 7, smoothing=0.1)
    box = (1, 3, 2, 5) if mode != "mixup" else None
    info = MixInfo(mode, 0.3 if mode == "mixup" else 1 - 6 / 24, box, GRID)
    _, _, mixed, _ = apply_mix(info, images, labels, hard, valid)
    _, _, want, _ = apply_mix(info, images, labels, hard.dense(), valid)
    assert isinstance(mixed, HardTokens) and mixed.index.shape[1] == (2 if mode == "mixup" else 1)
    torch.testing.assert_close(mixed.dense(), want, rtol=0, atol=1e-6)
