"""Combine several unlabelled scorers of the same items into one score, weighting each by its estimated accuracy.

The method is a continuous-score label model in the spirit of Snorkel (Ratner et al. 2017,
"Snorkel: Rapid Training Data Creation with Weak Supervision") and of the triplet method of
Fu et al. 2020 ("Fast and Three-rious: Speeding Up Weak Supervision with Triplet Methods"):

1. Standardise each source to mean 0, variance 1 over the N items.
2. Model each standardised source as `x_i = a_i * z + e_i`, with `z` the latent true score
   (standardised), `e_i` noise independent of `z` and of the other sources' noise, and
   `a_i = corr(x_i, z)` the source's *accuracy*. Then the observed correlations satisfy
   `c_ij = a_i * a_j` for i != j, so for any two other sources j, k:
   `a_i^2 = c_ij * c_ik / c_jk` (the triplet identity).
3. With M >= 3 sources, fit all the identities at once: least squares on the off-diagonal
   correlations, `min_a Σ_{i!=j} (c_ij - a_i a_j)^2 + λ Σ a_i^2` (a one-factor model fitted by
   minimum residuals), with λ = 1/sqrt(N), the standard error of a sample correlation. Each triplet identity is this fit's closed form on three sources; the joint
   fit uses every pair, so a pair (j, k) that barely correlates (where the ratio `c_ij c_ik / c_jk`
   explodes) cannot swamp the estimate. The ridge settles the case the data cannot: two accurate
   sources plus only useless ones, where only the product `a_i a_j` is identified and noise of
   order 1/sqrt(N) would otherwise pick an arbitrary split; the ridge pulls it towards the even
   split, as with two sources (it shrinks accuracies by a few percent, which the weights' ratios
   barely feel). It is solved by damped alternating updates
   `a_i <- (a_i + Σ_j c_ij a_j / (Σ_j a_j^2 + λ)) / 2` from a constant start, so the global
   sign follows the consensus (most sources better than random, as Snorkel assumes). Accuracies are
   clipped to [0, 0.99]: a source that disagrees with the consensus gets weight 0, never a
   flipped vote.
4. With two sources the accuracies are not identifiable from one correlation, so both get equal
   weight; one source gets weight 1.
5. Combine `combined = Σ w_i x_i` with `w_i ∝ a_i / (1 - a_i^2)`: the posterior mean of `z` under the
   Gaussian model above (each source's signal over its noise variance), normalised to sum 1.
   If every accuracy is 0 (no source agrees with any other) the weights fall back to equal.

Constant sources (zero variance) carry no information: they are standardised to 0 and get weight 0.
Everything is deterministic numpy.
"""

from __future__ import annotations

import numpy as np

# Caps a_i / (1 - a_i^2) at about 50: finite for a source equal to the consensus, and no single
# over-estimated accuracy can outvote everything else.
MAX_ACCURACY = 0.99
MAX_ITERATIONS = 5000


def standardise(scores: np.ndarray) -> np.ndarray:
    """Rows to mean 0, variance 1; constant rows become all zeros.

    Args:
        scores: [M, N] array, one row per source.
    Returns:
        [M, N] standardised array.
    """
    centred = scores - scores.mean(axis=1, keepdims=True)
    std = centred.std(axis=1, keepdims=True)
    safe = np.where(std > 1e-12, std, 1.0)
    return np.where(std > 1e-12, centred / safe, 0.0)


def accuracies(z: np.ndarray) -> np.ndarray:
    """Estimated correlation of each standardised source with the latent truth (one-factor fit).

    Args:
        z: [M, N] standardised scores, M >= 3.
    Returns:
        [M] accuracies in [0, MAX_ACCURACY].
    """
    m, n = z.shape
    c = z @ z.T / n  # [M, M] correlation matrix (rows already standardised)
    off = c - np.diag(np.diag(c))  # the model says nothing about the diagonal
    mean_off = off.sum() / (m * (m - 1))
    ridge = 1.0 / np.sqrt(n)
    a = np.full(m, np.sqrt(mean_off) if mean_off > 0 else 0.1)  # [M] constant start
    for _ in range(MAX_ITERATIONS):
        den = (a**2).sum() - a**2 + ridge  # [M] Σ_{j != i} a_j^2 + λ
        # Damped: the plain update oscillates along the ridge a_i * a_j = const.
        new = 0.5 * (a + off @ a / den)
        done = np.abs(new - a).max() < 1e-10
        a = new
        if done:
            break
    return np.clip(a, 0.0, MAX_ACCURACY)


def agree(sources: list[list[float]]) -> tuple[list[float], list[float]]:
    """Combine M sources scoring the same N items into one score per item.

    Args:
        sources: M lists of N scores each (any scale; higher is better).
    Returns:
        (combined, weights): N combined scores (a weighted sum of standardised sources, so mean 0)
        and the M weights used, which sum to 1.
    """
    m = len(sources)
    if m == 0:
        raise ValueError("agree needs at least one source")
    n = len(sources[0])
    if any(len(s) != n for s in sources):
        raise ValueError(
            f"all sources must score the same items; got lengths {[len(s) for s in sources]}"
        )
    x = np.asarray(sources, dtype=np.float64).reshape(m, n)
    if not np.isfinite(x).all():
        raise ValueError("agree got a NaN or infinite score")
    z = standardise(x)
    informative = z.any(axis=1)  # [M] False for constant sources

    if m >= 3 and n >= 2:
        acc = accuracies(z)
        raw = acc / (1.0 - acc**2)
    else:
        raw = informative.astype(np.float64)
    raw = np.where(informative, raw, 0.0)
    if raw.sum() <= 0:
        # No source agrees with any other (or all are constant): trust them equally.
        raw = informative.astype(np.float64) if informative.any() else np.ones(m)
    weights = raw / raw.sum()
    combined = weights @ z  # [N]
    return combined.tolist(), weights.tolist()
