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


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Position t predicts token t+1: drop the last logit and the first label.
    return logits[:, :-1, :], labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next label token, and the mask of tokens that count.

    Args:
        logits: (B, T, V) unshifted model outputs.
        labels: (B, T) token ids, IGNORE where no loss applies.
    Returns:
        (logps (B, T-1), mask (B, T-1) bool); logps are 0 where the mask is False.
    """
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)  # gather needs a valid index even where ignored
    # float32 log-softmax: bf16 logits lose too much precision over a long sum.
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


@loss("sft")
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens only (standard supervised fine-tuning).

    Args:
        logits: (B, T, V) unshifted model outputs.
        labels: (B, T) token ids, IGNORE on prompt and padding.
    Returns:
        () mean loss per counted token; 0 when no token counts.
    """
    logps, mask = token_logps(logits, labels)
    return -logps.sum() / mask.sum().clamp(min=1)


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
