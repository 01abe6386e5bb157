"""Token and class targets: densify, Gumbel draws, soft/argmax targets, smoothing, pooled class labels."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from shards.errors import UserError
from train.targets import class_targets, densify, token_targets

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
    hard = token_targets(probs, "argmax", smoothing=0.0)
    assert hard[0, :, 0].argmax(0).tolist() == [1, 2, 3]
    assert torch.equal(hard.sum(1), torch.ones(1, 1, 3))
    smoothed = token_targets(probs, "argmax", smoothing=0.1)
    assert torch.allclose(smoothed[0, :, 0, 0], torch.tensor([0.025, 0.925, 0.025, 0.025]))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_draws_follow_the_tempered_distribution(tau):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    probs = p[None, :, None, None].expand(1, 5, 40, 100)  # 4000 tokens, one draw each
    gen = torch.Generator().manual_seed(0)
    draws = token_targets(probs, "gumbel", tau=tau, smoothing=0.0, generator=gen)
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
    first = token_targets(probs, "gumbel", generator=torch.Generator().manual_seed(1))
    again = token_targets(probs, "gumbel", generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    a, b = token_targets(probs, "gumbel", generator=gen), token_targets(probs, "gumbel", generator=gen)
    assert torch.equal(first, again) and not torch.equal(a, b)
    # smoothing 0.1 over K=4 around a one-hot draw
    assert first.unique().tolist() == pytest.approx([0.025, 0.925])


def test_class_targets_plain_and_blended():
    labels = torch.tensor([2, 0])
    plain = class_targets(labels, 4, smoothing=0.1)
    assert torch.allclose(plain, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))
    probs = torch.cat([hand_map(), hand_map()])
    valid = torch.tensor([[[True, True, False]], [[False, False, False]]])
    blended = class_targets(labels, 4, smoothing=0.0, token_probs=probs, valid=valid, map_weight=0.5)
    pooled = (hand_map()[0, :, 0, 0] + hand_map()[0, :, 0, 1]) / 2
    assert torch.allclose(blended[0], 0.5 * torch.tensor([0, 0, 1.0, 0]) + 0.5 * pooled)
    assert torch.equal(blended[1], torch.tensor([1.0, 0, 0, 0]))  # no valid token: the image label alone


def test_bad_kind_is_a_user_error():
    with pytest.raises(UserError, match="unknown"):
        token_targets(hand_map(), "sample")
