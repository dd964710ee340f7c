"""The label model: accuracy-weighted combination of unlabelled score sources."""

from __future__ import annotations

import numpy as np
import pytest

from ralign.runtime.agree import accuracies, agree, standardise

N = 500


def sources(accs: list[float], seed: int = 0) -> tuple[np.ndarray, list[list[float]]]:
    """Latent z ~ N(0, 1) and one source per accuracy a: a * z + sqrt(1 - a^2) * noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=N)
    out = [(a * z + np.sqrt(1 - a**2) * rng.normal(size=N)).tolist() for a in accs]
    return z, out


def corr(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_source_gets_the_lowest_weight(seed):
    z, srcs = sources([0.95, 0.9, 0.0], seed)
    combined, weights = agree(srcs)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[2] == min(weights) and weights[2] < 0.05
    # Only the product of the two accuracies is identified; the ridge keeps the split near even.
    assert weights[0] > 0.25 and weights[1] > 0.25
    assert corr(combined, z) > corr(srcs[1], z)  # better than the weaker accurate source


@pytest.mark.parametrize(
    "accs", [[0.9, 0.7, 0.5], [0.9, 0.8, 0.7, 0.2, 0.0], [0.8, 0.8, 0.6, 0.4], [0.95, 0.6, 0.6]]
)
def test_accuracies_are_recovered_and_ordered(accs):
    z, srcs = sources(accs, seed=3)
    est = accuracies(standardise(np.asarray(srcs)))
    truth = [abs(corr(s, z)) for s in srcs]  # the sample accuracies
    np.testing.assert_allclose(est, truth, atol=0.1)
    _, weights = agree(srcs)
    assert np.argsort(weights).tolist() == np.argsort(truth).tolist()


@pytest.mark.parametrize("m", [2, 3, 5])
def test_identical_sources_get_equal_weights(m):
    _, (src,) = sources([0.8])
    combined, weights = agree([src] * m)
    assert weights == pytest.approx([1 / m] * m)
    np.testing.assert_allclose(combined, standardise(np.asarray([src]))[0], atol=1e-9)


def test_two_sources_get_equal_weights():
    _, srcs = sources([0.95, 0.3])
    assert agree(srcs)[1] == pytest.approx([0.5, 0.5])


def test_one_source_is_itself_standardised():
    combined, weights = agree([[1.0, 2.0, 3.0]])
    assert weights == [1.0]
    assert combined == pytest.approx([-1.2247449, 0.0, 1.2247449])


def test_anti_correlated_source_gets_no_weight():
    _, srcs = sources([0.9, 0.8, 0.85])
    srcs[1] = [-x for x in srcs[1]]
    weights = agree(srcs)[1]
    assert weights[1] == 0.0


def test_constant_source_gets_no_weight():
    _, srcs = sources([0.9, 0.8])
    combined, weights = agree([*srcs, [4.0] * N])
    assert weights == pytest.approx([0.5, 0.5, 0.0])


def test_scale_and_shift_do_not_matter():
    _, srcs = sources([0.9, 0.7, 0.5])
    moved = [srcs[0], [10 * x + 3 for x in srcs[1]], [x - 100 for x in srcs[2]]]
    a, b = agree(srcs), agree(moved)
    np.testing.assert_allclose(a[0], b[0], atol=1e-9)
    np.testing.assert_allclose(a[1], b[1], atol=1e-9)


def test_deterministic():
    _, srcs = sources([0.9, 0.7, 0.5, 0.1])
    assert agree(srcs) == agree(srcs)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "at least one source"),
        ([[1.0, 2.0], [1.0]], "same items"),
        ([[1.0, float("nan")]], "NaN"),
    ],
)
def test_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        agree(bad)
