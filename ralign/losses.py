"""Training losses and the log-probs they read: supervised cross-entropy and a registry of DPO losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100  # label value for tokens that carry no loss (prompt, padding)

LOSSES: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]] = {}


def loss(name: str) -> Callable[[Callable], Callable]:
    """Register a loss function under `name`."""

    def register(fn: Callable) -> Callable:
        LOSSES[name] = fn
        return fn

    return register


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which logits carry a loss: position t predicts token t+1, so (B, T) labels give (B, T-1).

    Returns:
        (B, T-1) bool, True where labels[:, t+1] is not IGNORE.
    """
    return labels[:, 1:] != IGNORE


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token, one logits row per target.

    Args:
        logits: (N, V) the logits that predict the targets.
        targets: (N,) token ids.
    Returns:
        (N,) float32; float32 log-softmax because bf16 logits lose too much precision over a long sum.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# A chunk of `linear_target_logps` holds at most this many logits (64 MiB in float32): on Qwen2's
# 152k vocabulary that is about 110 positions at a time, on SmolLM2's 49k about 340.
CHUNK_LOGITS = 2**24


def linear_target_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """`target_logps(hidden @ weight.T + bias, targets)` without holding (N, V) logits at once.

    The LM head and the log-softmax run a chunk of positions at a time: the forward keeps each
    position's logsumexp and target logit, the backward recomputes the chunk's logits and turns them
    into the gradient, so memory is one chunk's logits rather than (N, V) float32 plus autograd's
    saved copies. The matmul runs in the autocast dtype when autocast is on (as the head would),
    the softmax in float32.

    Args:
        hidden: (N, H) final hidden states at the positions that predict the targets.
        weight: (V, H) the LM head's weight (tied or not).
        bias: (V,) or None.
        targets: (N,) token ids.
        chunk_rows: positions per chunk; default fills `CHUNK_LOGITS` logits.
    Returns:
        (N,) float32 log-probabilities, differentiable in hidden, weight and bias.
    """
    rows = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _LinearTargetLogps.apply(hidden, weight, bias, targets, rows, dtype)


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    # (n, V) float32 logits of one chunk; autocast is off inside the Function, so cast explicitly.
    b = None if bias is None else bias.to(dtype)
    return F.linear(hidden.to(dtype), weight.to(dtype), b).float()


class _LinearTargetLogps(torch.autograd.Function):
    """The chunked LM head + log-softmax + gather behind `linear_target_logps`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                end = start + rows
                logits = _chunk_logits(hidden[start:end], weight, bias, dtype)
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1)
                out[start:end] = picked - lse[start:end]
        # When every position fits in one chunk, its logits are kept for the backward instead of
        # recomputed: the memory is the one chunk the forward held anyway, and the backward saves
        # an (N, H) x (H, V) matmul, a tenth of a small model's step.
        ctx.kept = logits if hidden.shape[0] <= rows else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        rows, dtype = ctx.rows, ctx.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Summed over chunks in float32, then cast once: like the one big matmul of the plain path.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        grad = grad.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                end = start + rows
                chunk = hidden[start:end]
                # d log p(t) / d logits = onehot(t) - softmax(logits), times the incoming gradient.
                if ctx.kept is None:
                    g = _chunk_logits(chunk, weight, bias, dtype)
                    g.sub_(lse[start:end, None])
                else:  # out of place: a second backward through a retained graph reads it again
                    g = ctx.kept - lse[start:end, None]
                g.exp_().mul_(-grad[start:end, None])
                g.scatter_add_(-1, targets[start:end, None], grad[start:end, None])
                g_low = g.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (g_low @ weight.to(dtype)).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g_low.t() @ chunk.to(dtype)).float()
                if grad_bias is not None:
                    grad_bias += g.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next label token, and the mask of tokens that count.

    Args:
        logits: (B, T, V) unshifted model outputs.
        labels: (B, T) token ids, IGNORE where no loss applies.
    Returns:
        (logps (B, T-1), mask (B, T-1) bool); logps are 0 where the mask is False.
    """
    mask = next_token_mask(labels)
    # Only the counted positions go through the log-softmax: prompt and padding rows cost nothing.
    return spread(target_logps(logits[:, :-1][mask], labels[:, 1:][mask]), mask), mask


def spread(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place per-target log-probs back at their (B, T-1) positions, 0 elsewhere."""
    return logps.new_zeros(mask.shape).masked_scatter(mask, logps)


def sft_loss_on_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sft_loss` from token log-probs: minus their mean over counted tokens; 0 when none count."""
    return -logps.sum() / mask.sum().clamp(min=1)


@loss("sft")
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens only (standard supervised fine-tuning).

    Args:
        logits: (B, T, V) unshifted model outputs.
        labels: (B, T) token ids, IGNORE on prompt and padding.
    Returns:
        () mean loss per counted token; 0 when no token counts.
    """
    return sft_loss_on_logps(*token_logps(logits, labels))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's label tokens, log pi(y|x).

    Args:
        logits: (B, T, V) unshifted model outputs.
        labels: (B, T) token ids, IGNORE on prompt and padding.
    Returns:
        (B,) float32 sums.
    """
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


# ---------------------------------------------------------------------------------------------
# DPO and its variants: each maps a batch of pairs to one loss per pair


@dataclass(frozen=True)
class PairScores:
    """What every DPO-style loss reads of a batch of B preference pairs.

    chosen / rejected: (B,) log-ratios log pi(y|x) - log ref(y|x) of the chosen and rejected
    responses (summed over their tokens); chosen_tokens / rejected_tokens: (B,) how many tokens
    each response has (IPO averages over them).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        """(B,) chosen minus rejected log-ratio: the implicit reward margin divided by beta."""
        return self.chosen - self.rejected


DpoLossFn = Callable[[PairScores, float, float], torch.Tensor]
DPO_LOSSES: dict[str, DpoLossFn] = {}
# The label_smoothing each loss accepts, as [low, high): one that does not use it takes only 0.
LABEL_SMOOTHING: dict[str, tuple[float, float]] = {}


def dpo_variant(
    name: str, label_smoothing: tuple[float, float] = (0.0, 0.0)
) -> Callable[[DpoLossFn], DpoLossFn]:
    """Register a DPO loss `fn(scores, beta, label_smoothing) -> (B,)` under `name`."""

    def register(fn: DpoLossFn) -> DpoLossFn:
        DPO_LOSSES[name] = fn
        LABEL_SMOOTHING[name] = label_smoothing
        return fn

    return register


@dpo_variant("sigmoid")
def sigmoid_loss(scores: PairScores, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", eq. 7:

        L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

    Args:
        scores: log-ratios of B pairs.
        beta: strength of the implicit KL penalty towards the reference.
        label_smoothing: unused (0); see `robust_loss` for noisy labels.
    Returns:
        (B,) loss per pair.
    """
    return -F.logsigmoid(beta * scores.margin)


@dpo_variant("ipo")
def ipo_loss(scores: PairScores, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, a squared loss that pulls the log-ratio margin to 1 / (2 tau) instead of
    pushing it to infinity:

        L = (h - 1 / (2 * beta))^2,  h = log-ratio(y_w) / |y_w| - log-ratio(y_l) / |y_l|

    As in TRL (whose comment says the authors confirmed it), each response's log-ratio is averaged
    over its tokens, so beta (the paper's tau) means the same at any response length.

    Args:
        scores: log-ratios and response lengths of B pairs.
        beta: the regularisation tau.
        label_smoothing: unused (0).
    Returns:
        (B,) loss per pair.
    """
    chosen = scores.chosen / scores.chosen_tokens.clamp(min=1)
    rejected = scores.rejected / scores.rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


@dpo_variant("hinge")
def hinge_loss(scores: PairScores, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge: the calibration loss of SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback", max(0, delta - log pi(y_w|x) + log pi(y_l|x)), on
    reference-normalised log-ratios with delta = 1 / beta as Liu et al. 2023 ("Statistical
    Rejection Sampling Improves Preference Optimization") write it, scaled by beta:

        L = max(0, 1 - beta * [log-ratio(y_w) - log-ratio(y_l)])

    Args:
        scores: log-ratios of B pairs.
        beta: 1 / margin the loss asks for.
        label_smoothing: unused (0).
    Returns:
        (B,) loss per pair.
    """
    return torch.relu(1 - beta * scores.margin)


@dpo_variant("robust", label_smoothing=(0.0, 0.5))
def robust_loss(scores: PairScores, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback": when each preference label is flipped with probability eps, this de-biased sigmoid
    loss has the clean loss as its expectation:

        L = [(1 - eps) * l(z) - eps * l(-z)] / (1 - 2 eps),  l(z) = -log sigmoid(z),  z = beta * margin

    Args:
        scores: log-ratios of B pairs.
        beta: as in sigmoid DPO.
        label_smoothing: eps, the flip rate, in [0, 0.5); 0 gives sigmoid DPO.
    Returns:
        (B,) loss per pair (can be negative when eps > 0).
    """
    z = beta * scores.margin
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@loss("dpo")
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DPO loss of `DPO_LOSSES` on a batch of pairs, averaged over the pairs (weighted by
    `weights` when given: sum(w * loss) / sum(w)).

    With `nll_weight` > 0 the chosen responses' mean per-token negative log-likelihood is added
    (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization"):

        L = L_dpo + nll_weight * mean_pairs(-log pi(y_w|x) / |y_w|)

    DPO alone can raise the margin by lowering both responses, the chosen one too; the NLL term
    keeps the chosen responses likely (e.g. a refusal the pairs prefer stays the greedy answer).

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) chosen under the frozen reference.
        ref_rejected_logps: (B,) rejected under the frozen reference.
        beta: the loss's temperature.
        kind: a name in `DPO_LOSSES`.
        label_smoothing: for the losses that take it (`LABEL_SMOOTHING`).
        chosen_tokens: (B,) response lengths; only IPO reads them (default: 1, no averaging).
        rejected_tokens: (B,) likewise.
        nll_weight: weight of the RPO term (>= 0); needs `chosen_tokens` when > 0.
        weights: (B,) each pair's weight (>= 0, not all 0); e.g. 1/k for each of a prompt's k
            pairs, so that every prompt weighs the same however many pairs it made.
    Returns:
        (loss () mean over the batch, chosen_rewards (B,), rejected_rewards (B,)); the rewards are
        beta * log-ratios, detached.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    ones = torch.ones_like(chosen)
    scores = PairScores(
        chosen,
        rejected,
        ones if chosen_tokens is None else chosen_tokens,
        ones if rejected_tokens is None else rejected_tokens,
    )
    losses = DPO_LOSSES[kind](scores, beta, label_smoothing)
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("the NLL term needs chosen_tokens, the chosen responses' lengths")
        losses = losses - nll_weight * policy_chosen_logps / chosen_tokens
    if weights is None:
        mean = losses.mean()
    else:  # a micro-batch of weight 0 adds nothing (not 0 / 0)
        mean = (losses * weights).sum() / weights.sum().clamp(min=1e-12)
    return mean, beta * chosen.detach(), beta * rejected.detach()
