"""Losses against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from ralign.losses import IGNORE, LOSSES, dpo_loss, sequence_logps, sft_loss

LN3 = math.log(3.0)
# Two-token vocabulary: logits (0, ln 3) give p = (1/4, 3/4), so log p(token 1) = ln(3/4).
LOGITS = torch.tensor([[[0.0, LN3], [LN3, 0.0], [5.0, -5.0]]])  # (1, 3, 2)
LOG_3_4 = -0.2876820724517809  # math.log(3 / 4)


@pytest.mark.parametrize(
    "labels, expected",
    [
        # Position t predicts labels[t+1]; label 0 is never predicted (nothing before it).
        ([IGNORE, 1, 0], -LOG_3_4),  # both targets likely: mean of two -ln(3/4)
        ([IGNORE, IGNORE, 0], -LOG_3_4),  # only the last target counts
        ([IGNORE, 1, IGNORE], -LOG_3_4),  # only the first target counts
        ([IGNORE, 0, 0], (math.log(4.0) - LOG_3_4) / 2),  # -ln(1/4) and -ln(3/4), averaged
        ([7, 0, 1], (math.log(4.0) + math.log(4.0)) / 2),  # first label is never a target
    ],
)
def test_sft_loss_hand_computed(labels, expected):
    assert sft_loss(LOGITS, torch.tensor([labels])).item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_ignores_masked_positions():
    labels = torch.tensor([[IGNORE, IGNORE, 0]])
    changed = LOGITS.clone()
    changed[0, 0] = torch.tensor([9.0, -9.0])  # predicts the masked label 1: must not matter
    assert sft_loss(changed, labels).item() == pytest.approx(sft_loss(LOGITS, labels).item())
    changed[0, 2] = torch.tensor([-9.0, 9.0])  # the last logit predicts nothing
    assert sft_loss(changed, labels).item() == pytest.approx(-LOG_3_4, abs=1e-6)


def test_sft_loss_averages_tokens_across_the_batch():
    logits = LOGITS.repeat(2, 1, 1)
    labels = torch.tensor([[IGNORE, 1, 0], [IGNORE, IGNORE, 1]])
    # three counted tokens: ln(3/4), ln(3/4), ln(1/4)
    expected = -(2 * LOG_3_4 + math.log(0.25)) / 3
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_all_masked_is_zero_not_nan():
    loss = sft_loss(LOGITS, torch.full((1, 3), IGNORE))
    assert loss.item() == 0.0


def test_sequence_logps_sums_label_tokens():
    logits = LOGITS.repeat(3, 1, 1)
    labels = torch.tensor([[IGNORE, 1, 0], [IGNORE, IGNORE, 0], [IGNORE, 0, IGNORE]])
    got = sequence_logps(logits, labels)
    assert got.shape == (3,)
    expected = [2 * LOG_3_4, LOG_3_4, math.log(0.25)]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "pc, pr, rc, rr, beta, expected",
    [
        # chosen ratio -1 - -2 = 1, rejected ratio -3 - -2.5 = -0.5, beta * 1.5 = 0.75
        (-1.0, -3.0, -2.0, -2.5, 0.5, 0.3868710061149),  # math.log(1 + math.exp(-0.75))
        # chosen ratio -0.2, rejected ratio 0.2, beta * -0.4 = -0.2
        (-4.0, -1.0, -3.8, -1.2, 0.5, 0.7981388693815917),  # math.log(1 + math.exp(0.2))
        # policy equals reference: loss is log 2 whatever beta is
        (-7.0, -2.0, -7.0, -2.0, 0.1, 0.6931471805599453),
    ],
)
def test_dpo_loss_hand_computed(pc, pr, rc, rr, beta, expected):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss, chosen_r, rejected_r = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert chosen_r.item() == pytest.approx(beta * (pc - rc))
    assert rejected_r.item() == pytest.approx(beta * (pr - rr))


def test_dpo_loss_batch_mean_rewards_and_gradient():
    pc = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-2.0, -3.8], dtype=torch.float64)
    rr = torch.tensor([-2.5, -1.2], dtype=torch.float64)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, 0.5)
    assert loss.item() == pytest.approx((0.3868710061149 + 0.7981388693815917) / 2, abs=1e-9)
    assert chosen_r.tolist() == pytest.approx([0.5, -0.1])
    assert rejected_r.tolist() == pytest.approx([-0.25, 0.1])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    loss.backward()
    # dL/dpc_i = -beta * sigmoid(-z_i) / B, with z = (0.75, -0.2); dL/dpr_i is its negation.
    expected = [-0.5 * 0.320821300824607 / 2, -0.5 * 0.549833997312478 / 2]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-9)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-9)


def test_registry():
    assert LOSSES == {"sft": sft_loss, "dpo": dpo_loss}
