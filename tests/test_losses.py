"""Losses and log-probs against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from ralign.losses import (
    DPO_LOSSES,
    IGNORE,
    LABEL_SMOOTHING,
    LOSSES,
    PairScores,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    linear_target_logps,
    robust_loss,
    sequence_logps,
    sft_loss,
    sigmoid_loss,
    target_logps,
)

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


def test_dpo_loss_weighted_mean_over_pairs():
    """Weights (1/k for each of a prompt's k pairs) give sum(w * loss) / sum(w): the two pairs
    above weighted 3:1, and a pair of weight 0 counts for nothing (nor in the gradient)."""
    pc = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], dtype=torch.float64)
    rc = torch.tensor([-2.0, -3.8], dtype=torch.float64)
    rr = torch.tensor([-2.5, -1.2], dtype=torch.float64)
    w = torch.tensor([0.75, 0.25], dtype=torch.float64)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, weights=w)
    assert loss.item() == pytest.approx(0.75 * 0.3868710061149 + 0.25 * 0.7981388693815917)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, weights=torch.tensor([2.0, 0.0]).double())
    assert loss.item() == pytest.approx(0.3868710061149)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([-0.5 * 0.320821300824607, 0.0], abs=1e-9)
    # equal weights are the plain mean
    same, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, weights=torch.tensor([0.5, 0.5]).double())
    plain, _, _ = dpo_loss(pc, pr, rc, rr, 0.5)
    assert same.item() == pytest.approx(plain.item(), abs=1e-12)


def test_registry():
    assert LOSSES == {"sft": sft_loss, "dpo": dpo_loss}
    assert DPO_LOSSES == {
        "sigmoid": sigmoid_loss,
        "ipo": ipo_loss,
        "hinge": hinge_loss,
        "robust": robust_loss,
    }
    # label smoothing is the robust loss's alone (as in TRL 1.16: its sigmoid ignores it)
    assert LABEL_SMOOTHING == {
        "sigmoid": (0.0, 0.0),
        "ipo": (0.0, 0.0),
        "hinge": (0.0, 0.0),
        "robust": (0.0, 0.5),
    }


LOG_1_4 = -1.3862943611198906  # math.log(1 / 4)


def scores(chosen, rejected, chosen_tokens=1.0, rejected_tokens=1.0) -> PairScores:
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return PairScores(t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens))


@pytest.mark.parametrize(
    "name, pair, beta, smoothing, expected",
    [
        # sigmoid: -log sigmoid(beta * margin); margin ln 3 gives -ln(3/4), margin 0 gives ln 2
        ("sigmoid", (LN3, 0.0), 1.0, 0.0, -LOG_3_4),
        ("sigmoid", (0.5, 0.5), 0.1, 0.0, math.log(2.0)),
        # ipo: (c/|c| - r/|r| - 1/(2 beta))^2
        ("ipo", (1.0, -0.5, 2, 1), 0.5, 0.0, 0.0),  # 0.5 + 0.5 = 1 = 1/(2 * 0.5)
        ("ipo", (1.0, -0.5, 2, 1), 0.25, 0.0, 1.0),  # (1 - 2)^2
        ("ipo", (3.0, 1.0, 3, 4), 1.0, 0.0, 0.0625),  # 1 - 0.25 = 0.75; (0.75 - 0.5)^2
        ("ipo", (3.0, 1.0, 1, 1), 1.0, 0.0, 2.25),  # unaveraged would be (2 - 0.5)^2
        # hinge: max(0, 1 - beta * margin)
        ("hinge", (1.0, -0.5), 0.5, 0.0, 0.25),  # 1 - 0.75
        ("hinge", (2.0, -1.0), 1.0, 0.0, 0.0),  # margin 3 > 1 / beta: no loss
        ("hinge", (-1.0, 0.0), 0.5, 0.0, 1.5),  # 1 + 0.5
        # robust: [(1 - e) l(z) - e l(-z)] / (1 - 2e), l(z) = -log sigmoid(z)
        ("robust", (0.0, 0.0), 1.0, 0.25, math.log(2.0)),  # ln2 (1 - 2e) / (1 - 2e)
        ("robust", (LN3, 0.0), 1.0, 0.0, -LOG_3_4),  # e = 0: sigmoid DPO
        # e = 1/4: [0.75 * -ln(3/4) + 0.25 * ln(1/4)] / 0.5
        ("robust", (LN3, 0.0), 1.0, 0.25, (-0.75 * LOG_3_4 + 0.25 * LOG_1_4) / 0.5),
    ],
)
def test_dpo_losses_hand_computed(name, pair, beta, smoothing, expected):
    got = DPO_LOSSES[name](scores(*pair), beta, smoothing)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_dpo_loss_passes_kind_smoothing_and_lengths():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # log-ratios: chosen (-1 - -4) = 3 over 3 tokens, rejected (-2 - -3) = 1 over 4 tokens
    loss, chosen_r, rejected_r = dpo_loss(
        t(-1.0), t(-2.0), t(-4.0), t(-3.0), 1.0,
        kind="ipo", chosen_tokens=t(3.0), rejected_tokens=t(4.0),
    )  # fmt: skip
    assert loss.item() == pytest.approx(0.0625)  # as the third ipo case above
    assert (chosen_r.item(), rejected_r.item()) == (3.0, 1.0)  # beta * log-ratio, not averaged
    loss, _, _ = dpo_loss(t(LN3), t(0.0), t(0.0), t(0.0), 1.0, kind="robust", label_smoothing=0.25)
    assert loss.item() == pytest.approx((-0.75 * LOG_3_4 + 0.25 * LOG_1_4) / 0.5)


def test_dpo_loss_adds_the_chosen_per_token_nll():
    """RPO (Pang et al. 2024): L_dpo + w * (-log pi(y_w|x) / |y_w|), averaged over pairs."""
    t = lambda *x: torch.tensor(x, dtype=torch.float64, requires_grad=True)  # noqa: E731
    pc, pr = t(-2.0, -6.0), t(-3.0, -1.0)
    # policy = reference: the sigmoid loss is log 2 per pair; NLL per token 2/4 and 6/2
    loss, chosen_r, _ = dpo_loss(
        pc, pr, t(-2.0, -6.0), t(-3.0, -1.0), 0.1,
        chosen_tokens=torch.tensor([4.0, 2.0], dtype=torch.float64), nll_weight=0.5,
    )  # fmt: skip
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * (0.5 + 3.0) / 2, abs=1e-12)
    assert chosen_r.tolist() == [0.0, 0.0]  # the rewards are the preference loss's alone
    loss.backward()
    # d/dpc_i = (-beta * sigmoid(0) - w / |y_w,i|) / B; the rejected side only sees DPO
    assert pc.grad.tolist() == pytest.approx([(-0.05 - 0.125) / 2, (-0.05 - 0.25) / 2])
    assert pr.grad.tolist() == pytest.approx([0.05 / 2, 0.05 / 2])
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), 0.1, nll_weight=1.0)


# --- the fused LM head + log-softmax -------------------------------------------------------------

# One position whose logits are (0, ln 3): hidden (1, 0) through a head whose rows are (0, 0) and
# (ln 3, 0); p = (1/4, 3/4).
HIDDEN = torch.tensor([[1.0, 0.0]])
WEIGHT = torch.tensor([[0.0, 0.0], [LN3, 0.0]])


@pytest.mark.parametrize("target, expected", [(1, LOG_3_4), (0, LOG_1_4)])
def test_linear_target_logps_hand_computed(target, expected):
    hidden = HIDDEN.clone().requires_grad_()
    weight = WEIGHT.clone().requires_grad_()
    bias = torch.zeros(2, requires_grad=True)
    logp = linear_target_logps(hidden, weight, bias, torch.tensor([target]))
    assert logp.item() == pytest.approx(expected, abs=1e-6)
    logp.sum().backward()
    # d log p(t) / d logits = onehot(t) - p: (-1/4, 1/4) for target 1, (3/4, -3/4) for target 0
    dlogits = torch.tensor([-0.25, 0.25]) if target == 1 else torch.tensor([0.75, -0.75])
    assert torch.allclose(bias.grad, dlogits)
    assert torch.allclose(weight.grad, dlogits[:, None] * HIDDEN)  # outer product with hidden
    assert torch.allclose(hidden.grad, (dlogits @ WEIGHT)[None])  # (ln3 / 4, 0) for target 1


def test_linear_target_logps_chunks_rows_independently():
    # Second position: hidden (0, 1) gives logits (0, 0), p = 1/2 whatever the target.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = linear_target_logps(hidden, WEIGHT, None, torch.tensor([1, 0, 0]), chunk_rows=1)
    assert got.tolist() == pytest.approx([LOG_3_4, math.log(0.5), LOG_1_4], abs=1e-6)


@pytest.mark.parametrize("rows", [1, 4, 37, None])  # None: the default chunk, one here
@pytest.mark.parametrize("bias", [False, True])
def test_linear_target_logps_equals_the_plain_path(rows, bias):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    inputs = [hidden, weight] + ([b] if bias else [])
    plain = target_logps(torch.nn.functional.linear(hidden, weight, b), targets)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), inputs)
    ours = linear_target_logps(hidden, weight, b, targets, chunk_rows=rows)
    our_grads = torch.autograd.grad((ours * upstream).sum(), inputs)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, plain, atol=1e-5)
    for a, e in zip(our_grads, plain_grads, strict=True):
        assert torch.allclose(a, e, atol=1e-5)


def test_linear_target_logps_under_bf16_autocast_matches_the_head_it_replaces():
    """Under autocast the matmul runs in bf16, as the model's own head would; the log-softmax in
    float32. The log-probs equal the plain path's under the same autocast to 1e-4."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = target_logps(torch.nn.functional.linear(hidden, weight), targets)
        ours = linear_target_logps(hidden, weight, None, targets, chunk_rows=2)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, plain, atol=1e-4)
    exact = target_logps(hidden @ weight.T, targets)
    assert not torch.allclose(ours, exact, atol=1e-4)  # bf16 did run (its rounding shows)


@pytest.mark.parametrize("rows", [None, 2])  # one chunk (its logits kept), or recomputed chunks
def test_linear_target_logps_backward_twice_through_a_retained_graph(rows):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (5,), generator=g)
    loss = linear_target_logps(hidden, weight, None, targets, chunk_rows=rows).sum()
    first = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, weight])
    plain = torch.autograd.grad(
        target_logps(torch.nn.functional.linear(hidden, weight), targets).sum(), [hidden, weight]
    )
    for a, b, c in zip(first, second, plain, strict=True):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-5)
