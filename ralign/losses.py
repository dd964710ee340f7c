"""Training losses on token logits: supervised cross-entropy and sigmoid DPO."""

from __future__ import annotations

from collections.abc import Callable

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


@loss("dpo")
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss: Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", eq. 7:

        L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) the same for the rejected responses.
        ref_chosen_logps: (B,) chosen under the frozen reference.
        ref_rejected_logps: (B,) rejected under the frozen reference.
        beta: strength of the implicit KL penalty towards the reference.
    Returns:
        (loss () mean over the batch, chosen_rewards (B,), rejected_rewards (B,)); the rewards are
        beta * log-ratios, detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
