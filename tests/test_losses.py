"""Token-label loss: hand-computed values for a 2-token, 3-class case, validity masking, beta=0."""

import math

import pytest
import torch

from train.losses import token_label_loss
from train.targets import HardTokens

LN2, LN3 = math.log(2), math.log(3)
# class: softmax([ln2, 0, 0]) = [1/2, 1/4, 1/4], target class 1 -> CE = ln 4
CLS_LOGITS = torch.tensor([[LN2, 0.0, 0.0]])
CLS_TARGET = torch.tensor([[0.0, 1.0, 0.0]])
# token 0: softmax = [1/3]*3, target [1, 0, 0] -> CE = ln 3
# token 1: softmax([0, ln2, 0]) = [1/4, 1/2, 1/4], target [1/2, 1/2, 0] -> CE = (ln 4 + ln 2) / 2 = 1.5 ln 2
TOKEN_LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0]]])
TOKEN_TARGET = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]])
CLS_CE, TOK0_CE, TOK1_CE = 2 * LN2, LN3, 1.5 * LN2


def loss(**kwargs):
    args = dict(cls_logits=CLS_LOGITS, cls_target=CLS_TARGET, token_logits=TOKEN_LOGITS, token_target=TOKEN_TARGET)
    return token_label_loss(**{**args, **kwargs})


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_hand_computed_values(beta):
    total, parts = loss(beta=beta)
    token = (TOK0_CE + TOK1_CE) / 2
    assert parts["cls"].item() == pytest.approx(CLS_CE, rel=1e-6)
    assert parts["token"].item() == pytest.approx(token, rel=1e-6)
    assert total.item() == pytest.approx(CLS_CE + beta * token, rel=1e-6)


def test_class_ids_and_half_precision_targets():
    total, parts = loss(cls_target=torch.tensor([1]), token_target=TOKEN_TARGET.half())
    assert parts["cls"].item() == pytest.approx(CLS_CE, rel=1e-6)
    assert total.item() == pytest.approx(CLS_CE + (TOK0_CE + TOK1_CE) / 2, rel=1e-6)


def test_invalid_tokens_are_ignored():
    logits = TOKEN_LOGITS.clone().requires_grad_()
    total, parts = loss(token_logits=logits, valid=torch.tensor([[True, False]]))
    assert parts["token"].item() == pytest.approx(TOK0_CE, rel=1e-6)
    total.backward()
    assert logits.grad[0, 0].abs().sum() > 0
    assert torch.equal(logits.grad[0, 1], torch.zeros(3))


def test_float_weights_and_no_valid_tokens():
    _, parts = loss(valid=torch.tensor([[1.0, 3.0]]))
    assert parts["token"].item() == pytest.approx((TOK0_CE + 3 * TOK1_CE) / 4, rel=1e-6)
    total, parts = loss(valid=torch.tensor([[False, False]]))
    assert parts["token"].item() == 0.0
    assert total.item() == pytest.approx(CLS_CE, rel=1e-6)


def test_beta_zero_is_the_plain_class_loss():
    for total, parts in (loss(beta=0.0), token_label_loss(CLS_LOGITS, CLS_TARGET)):
        assert total.item() == pytest.approx(CLS_CE, rel=1e-6)
        assert set(parts) == {"cls"}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_targets_give_the_loss_of_their_dense_form(smoothing):
    """Class ids (one per token, or two with Mixup weights) cost what their smoothed one-hot maps cost."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=gen)  # [B, N, K]
    valid = torch.rand(3, 6, generator=gen) < 0.7
    one = HardTokens.of(torch.randint(0, 5, (3, 2, 3), generator=gen), 5, smoothing)
    two = one.blend(0.3)
    for hard in (one, two):
        flat = hard.map(lambda t: t.flatten(2))  # [B, M, N]
        dense = hard.dense().flatten(2).transpose(1, 2)  # [B, N, K]
        got, _ = token_label_loss(CLS_LOGITS.expand(3, 3), CLS_TARGET.expand(3, 3), logits, flat, valid)
        want, _ = token_label_loss(CLS_LOGITS.expand(3, 3), CLS_TARGET.expand(3, 3), logits, dense, valid)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
