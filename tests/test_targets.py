"""Token and class targets: densify, Gumbel draws, soft/argmax targets, smoothing, pooled class labels."""

import math

import numpy as np
import pytest
import torch
from reference import densify, resample_maps
from scipy.stats import chisquare

from common.errors import UserError
from core.imaging.mappings import crop_mapping, hflip_mapping, rotate_mapping
from train.targets import (
    class_targets,
    pooled_label,
    stored_token_probs,
    stored_token_targets,
    token_targets,
)

torch.set_num_threads(1)


def test_densify_is_the_top_k_softmax_scattered():
    rng = np.random.default_rng(0)
    k, h, w, num_classes = 3, 2, 3, 9
    scores = np.sort(rng.normal(0, 3, (2, k, h, w)), axis=1)[:, ::-1].astype(np.float16)
    classes = np.stack([[rng.permutation(num_classes)[:k] for _ in range(h * w)] for _ in range(2)])
    classes = classes.transpose(0, 2, 1).reshape(2, k, h, w).astype(np.int16)
    dense = densify(torch.tensor(scores), torch.tensor(classes), num_classes)
    assert dense.shape == (2, num_classes, h, w) and dense.dtype == torch.float32
    for b in range(2):
        for i in range(h):
            for j in range(w):
                logits = scores[b, :, i, j].astype(np.float64)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                want = np.zeros(num_classes)
                want[classes[b, :, i, j]] = p
                np.testing.assert_allclose(dense[b, :, i, j].numpy(), want, atol=1e-6)


def test_densify_leaves_skipped_cells_empty():
    scores = torch.tensor([[[[2.0]], [[1.0]]], [[[float("nan")]], [[float("nan")]]]], dtype=torch.float16)
    classes = torch.tensor([[[[4]], [[0]]], [[[-1]], [[-1]]]], dtype=torch.int32)
    dense = densify(scores, classes, 5)
    e = math.exp(1.0)
    np.testing.assert_allclose(dense[0, :, 0, 0].numpy(), [1 / (1 + e), 0, 0, 0, e / (1 + e)], atol=1e-6)
    assert torch.equal(dense[1], torch.zeros(5, 1, 1))


def hand_map() -> torch.Tensor:
    """[1, 4, 1, 3]: three tokens with known distributions over 4 classes."""
    return torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.4, 0.1], [0.0, 0.0, 0.0, 1.0]]).T.reshape(1, 4, 1, 3)


def test_softmax_argmax_and_smoothing_exact():
    probs = hand_map()
    soft = token_targets(probs, "softmax", smoothing=0.2)
    torch.testing.assert_close(soft, probs * 0.8 + 0.05, rtol=0, atol=1e-7)
    hard = token_targets(probs, "argmax", smoothing=0.0).dense()
    assert hard[0, :, 0].argmax(0).tolist() == [1, 2, 3]
    assert torch.equal(hard.sum(1), torch.ones(1, 1, 3))
    smoothed = token_targets(probs, "argmax", smoothing=0.1).dense()
    assert torch.allclose(smoothed[0, :, 0, 0], torch.tensor([0.025, 0.925, 0.025, 0.025]))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_draws_follow_the_tempered_distribution(tau):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    probs = p[None, :, None, None].expand(1, 5, 40, 100)  # 4000 tokens, one draw each
    gen = torch.Generator().manual_seed(0)
    draws = token_targets(probs, "gumbel", tau=tau, smoothing=0.0, generator=gen).dense()
    assert torch.equal(draws.sum(1), torch.ones(1, 40, 100)) and set(draws.unique().tolist()) == {0.0, 1.0}
    counts = draws.sum((0, 2, 3)).numpy()
    assert counts[4] == 0  # a class of probability 0 is never drawn
    expected = p[:4].numpy() ** (1 / tau)
    expected = expected / expected.sum() * counts.sum()
    assert chisquare(counts[:4], expected).pvalue > 1e-3
    # and a wrong distribution is rejected by the same test
    assert chisquare(counts[:4], np.full(4, counts.sum() / 4)).pvalue < 1e-6


def test_gumbel_draws_afresh_and_replays_with_a_seed():
    probs = hand_map().expand(2, 4, 8, 3)
    first = token_targets(probs, "gumbel", generator=torch.Generator().manual_seed(1)).dense()
    again = token_targets(probs, "gumbel", generator=torch.Generator().manual_seed(1)).dense()
    gen = torch.Generator().manual_seed(2)
    a, b = (token_targets(probs, "gumbel", generator=gen).dense() for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(a, b)
    # smoothing 0.1 over K=4 around a one-hot draw
    assert first.unique().tolist() == pytest.approx([0.025, 0.925])


def stored_maps(rng: np.random.Generator, batch: int, k: int, map_hw: tuple[int, int], num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k maps as stored: sorted float16 logits, k distinct classes per cell; sample 0 skipped, and
    a few cells of the others skipped too (class -1, NaN logits)."""
    h, w = map_hw
    scores = np.sort(rng.normal(0, 3, (batch, k, h, w)), axis=1)[:, ::-1].astype(np.float16)
    classes = np.argsort(rng.random((batch, h, w, num_classes)), -1)[..., :k].transpose(0, 3, 1, 2).astype(np.int16)
    skipped = rng.random((batch, 1, h, w)) < 0.1
    skipped[0] = True
    classes = np.where(skipped, -1, classes)
    scores = np.where(skipped, np.float16("nan"), scores)
    return torch.tensor(scores), torch.tensor(classes)


def student_views(rng: np.random.Generator, batch: int, image_wh: tuple[int, int], size: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mappings (crops reaching beyond the footprint, flips, rotations) and centred-square footprints."""
    width, height = image_wh
    side = min(width, height)
    footprint = torch.tensor([(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2])
    mappings = []
    for _ in range(batch):
        cw, ch = rng.uniform(0.3, 1.0) * width, rng.uniform(0.3, 1.0) * height
        m = crop_mapping(rng.uniform(0, width - cw), rng.uniform(0, height - ch), cw, ch, size)
        if rng.random() < 0.5:
            m = m @ hflip_mapping(size[1])
        mappings.append(m @ rotate_mapping(rng.uniform(-30, 30), size))
    return torch.tensor(np.stack(mappings)), footprint.expand(batch, 4)


CASES = [(1000, 5, (18, 18), (14, 14), (224, 224)), (10, 5, (8, 8), (8, 8), (64, 64)),
         (7, 3, (6, 10), (5, 7), (60, 84)), (50, 1, (14, 14), (4, 4), (64, 64))]


@pytest.mark.parametrize("points", [1, 2, 3])
@pytest.mark.parametrize("num_classes,k,map_hw,grid,size", CASES)
def test_stored_targets_equal_the_dense_chain(num_classes, k, map_hw, grid, size, points):
    rng = np.random.default_rng(num_classes + points)
    batch = 6
    scores, classes = stored_maps(rng, batch, k, map_hw, num_classes)
    mappings, footprints = student_views(rng, batch, (300, 200), size)
    probs, valid = resample_maps(densify(scores, classes, num_classes), mappings, footprints, size, grid, points)
    got, got_valid = stored_token_probs(scores, classes, mappings, footprints, num_classes, size, grid, points=points)
    assert torch.equal(got, probs) and torch.equal(got_valid, valid)  # bit for bit
    for kind in ("softmax", "argmax"):
        targets, got_valid, pooled = stored_token_targets(scores, classes, mappings, footprints, num_classes, size,
                                                          grid, kind=kind, smoothing=0.1, points=points)
        want = token_targets(probs, kind, smoothing=0.1)
        assert torch.equal(targets.dense(), want.dense()) if kind == "argmax" else torch.equal(targets, want)
        assert torch.equal(got_valid, valid)
        torch.testing.assert_close(pooled, pooled_label(probs, valid), rtol=0, atol=1e-6)
        assert pooled[0].sum() == 0 and (pooled[1:].sum(1) > 0).all()  # sample 0 has no valid token
    # the sample and token kinds the test must cover: a skipped sample, tokens off the footprint or on
    # skipped cells, and (with several points) tokens that see several cells
    assert not valid[0].any() and valid[1:].any() and not valid[1:].all()
    if points > 1:
        assert ((probs > 0).sum(1) > k).any()
    # a Gumbel draw is a smoothed one-hot of a class the token can have; tokens without a label draw class 0
    drawn, _, pooled = stored_token_targets(scores, classes, mappings, footprints, num_classes, size, grid,
                                            points=points, smoothing=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pooled, pooled_label(probs, valid), rtol=0, atol=1e-6)
    drawn = drawn.dense()
    assert torch.equal(drawn.sum(1), torch.ones(batch, *grid)) and set(drawn.unique().tolist()) == {0.0, 1.0}
    winner = drawn.argmax(1)
    assert (probs.gather(1, winner[:, None])[:, 0][valid] > 0).all()
    assert (winner[~valid] == 0).all()


def test_stored_bilinear_matches_the_dense_chain():
    rng = np.random.default_rng(5)
    scores, classes = stored_maps(rng, 6, 5, (12, 12), 100)
    mappings, footprints = student_views(rng, 6, (260, 200), (96, 96))
    dense = densify(scores, classes, 100)
    for points in (1, 2):
        probs, valid = resample_maps(dense, mappings, footprints, 96, (6, 6), points, mode="bilinear")
        got, got_valid = stored_token_probs(scores, classes, mappings, footprints, 100, 96, (6, 6), points=points,
                                            mode="bilinear")
        torch.testing.assert_close(got, probs, rtol=0, atol=1e-6)
        assert torch.equal(got_valid, valid)


def four_cell_token(batch: int) -> tuple[torch.Tensor, ...]:
    """`batch` copies of a 2x2 map seen by one token with points=2, a point per cell: the same class is stored
    in several cells at different ranks, one cell is skipped (class -1), and class 0 is never stored."""
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.5, 1.0, 0.5], [3.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float16)
    classes = torch.tensor([[1, 2, 3], [2, 4, 1], [5, 1, 6], [-1, -1, -1]], dtype=torch.int16)
    view = lambda t: t.T.reshape(1, 3, 2, 2).expand(batch, 3, 2, 2)  # noqa: E731
    mapping = torch.tensor(crop_mapping(0, 0, 2, 2, 2)).expand(batch, 3, 3)
    return view(scores), view(classes), mapping, torch.tensor([0.0, 0.0, 2.0, 2.0]).expand(batch, 4)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_stored_gumbel_draws_follow_the_tempered_token_distribution(tau):
    scores, classes, mapping, footprint = four_cell_token(4000)
    gen = torch.Generator().manual_seed(0)
    draws, valid, _ = stored_token_targets(scores, classes, mapping, footprint, 8, 2, (1, 1), tau=tau,
                                           smoothing=0.0, points=2, generator=gen)
    draws, probs = draws.dense(), stored_token_probs(scores, classes, mapping, footprint, 8, 2, (1, 1))[0]
    assert valid.all()
    p = probs[0, :, 0, 0].double().numpy()
    assert (p[[0, 7]] == 0).all() and (p[1:7] > 0).all()
    counts = draws.sum((0, 2, 3)).numpy()
    assert counts[[0, 7]].sum() == 0  # classes of probability 0, among them the skipped cell's stand-in 0
    expected = p[1:7] ** (1 / tau)
    expected = expected / expected.sum() * counts.sum()
    assert chisquare(counts[1:7], expected).pvalue > 1e-3
    # the same test rejects a wrong distribution: each stored candidate on its own (not summed per class)
    # at tau = 1, the untempered p otherwise
    wrong = np.bincount(classes[0].flatten().clamp(min=0).numpy(), minlength=8)[1:7] if tau == 1 else p[1:7]
    assert chisquare(counts[1:7], wrong / wrong.sum() * counts.sum()).pvalue < 1e-6


def test_stored_gumbel_draws_afresh_and_replays_with_a_seed():
    args = four_cell_token(64)
    first, again = (stored_token_targets(*args, 8, 2, (1, 1), generator=torch.Generator().manual_seed(1))[0].dense()
                    for _ in range(2))
    gen = torch.Generator().manual_seed(2)
    a, b = (stored_token_targets(*args, 8, 2, (1, 1), generator=gen)[0].dense() for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(a, b)
    assert first.unique().tolist() == pytest.approx([0.1 / 8, 0.9 + 0.1 / 8])


def test_stored_bad_kind_or_mode_is_a_user_error():
    with pytest.raises(UserError, match="kind"):
        stored_token_targets(*four_cell_token(1), 8, 2, (1, 1), kind="sample")
    with pytest.raises(UserError, match="mode"):
        stored_token_targets(*four_cell_token(1), 8, 2, (1, 1), mode="cubic")


def test_class_targets_plain_and_blended():
    labels = torch.tensor([2, 0])
    plain = class_targets(labels, 4, smoothing=0.1)
    assert torch.allclose(plain, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))
    probs = torch.cat([hand_map(), hand_map()])
    valid = torch.tensor([[[True, True, False]], [[False, False, False]]])
    blended = class_targets(labels, 4, smoothing=0.0, pooled=pooled_label(probs, valid), map_weight=0.5)
    pooled = (hand_map()[0, :, 0, 0] + hand_map()[0, :, 0, 1]) / 2
    assert torch.allclose(blended[0], 0.5 * torch.tensor([0, 0, 1.0, 0]) + 0.5 * pooled)
    assert torch.equal(blended[1], torch.tensor([1.0, 0, 0, 0]))  # no valid token: the image label alone


def test_bad_kind_is_a_user_error():
    with pytest.raises(UserError, match="unknown"):
        token_targets(hand_map(), "sample")
