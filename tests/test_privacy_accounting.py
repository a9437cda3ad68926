"""Privacy accounting against the closed form, not against the library it calls: for a Gaussian
mechanism applied to every example at every step (sampling rate 1), the Rényi DP of T steps at
order α is T·α / (2σ²) (Mironov 2017, Prop. 7), and (α-RDP ε_α) gives
(ε_α + log((α−1)/α) − (log δ + log α) / (α − 1), δ)-DP (Balle et al. 2020, Thm. 21). The
best order, found here by a fine search, bounds what any accountant's order grid can give."""

import math

import numpy as np
import pytest

import shardml

pytest.importorskip("dp_accounting")


def closed_form_epsilon(sigma: float, steps: int, delta: float) -> float:
    alpha = np.linspace(1.0005, 2000.0, 4_000_000)
    rdp = steps * alpha / (2 * sigma**2)
    eps = rdp + np.log((alpha - 1) / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)
    return float(eps.min())


def mironov_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The older, looser conversion ε_α + log(1/δ) / (α − 1): an upper bound on the one above."""
    alpha = np.linspace(1.0005, 2000.0, 4_000_000)
    return float((steps * alpha / (2 * sigma**2) + math.log(1 / delta) / (alpha - 1)).min())


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (0.8, 200, 1e-6), (4.0, 50, 1e-5), (10.0, 1000, 1e-6)])
def test_full_batch_dp_sgd_epsilon_equals_the_closed_form(sigma, steps, delta):
    got = shardml.dp_sgd_epsilon(sigma, 1.0, steps, delta)
    best = closed_form_epsilon(sigma, steps, delta)
    # The accountant minimises over a grid of orders, so it can only be at or above the best order;
    # 2 % above it is its grid's resolution, a wrong formula (a factor of 2 in the RDP, the looser
    # conversion) is far outside.
    assert best * (1 - 1e-6) <= got <= best * 1.02, (got, best)
    assert got < mironov_epsilon(sigma, steps, delta)


def test_dp_fedavg_with_the_whole_cohort_is_the_full_batch_gaussian_mechanism():
    # Every client in every round (cohort = clients): the sampling rate is 1.
    assert shardml.dp_fedavg_epsilon(1.5, 10, 10, 40, 1e-5) == pytest.approx(
        closed_form_epsilon(1.5, 40, 1e-5), rel=0.02)


def test_subsampling_and_noise_spend_less_privacy_and_no_noise_spends_all():
    full = shardml.dp_sgd_epsilon(1.0, 1.0, 100, 1e-5)
    assert shardml.dp_sgd_epsilon(1.0, 0.01, 100, 1e-5) < full / 5, "a 1 % sample must amplify privacy"
    assert shardml.dp_sgd_epsilon(2.0, 1.0, 100, 1e-5) < full
    assert shardml.dp_sgd_epsilon(0.0, 1.0, 100, 1e-5) == math.inf
