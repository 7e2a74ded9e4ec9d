"""scripts/experiments/ssm_reach.py: the share of a fresh S4 filter's weight beyond a lag (seconds)."""

import math

import pytest
from conftest import load_script

pytestmark = pytest.mark.lab

ssm_reach = load_script("experiments/ssm_reach")


def test_share_beyond_lag_follows_the_time_scales():
    """Lag 0 holds everything; the share falls with the lag; the default step sizes (time scales up to ~200 tokens)
    put almost nothing beyond 2,048 tokens, step sizes 16x smaller a large part."""
    lags = [0, 256, 512, 2048]
    default = ssm_reach.kernel_share_beyond(0.01, 1.0, lags, channels=16, length=8192)
    long = ssm_reach.kernel_share_beyond(1.2e-4, 2e-3, lags, channels=16, length=8192)
    for share in (default, long):
        assert share[0] == pytest.approx(1.0)
        assert share[0] > share[256] > share[512] > share[2048]
    assert default[2048] < 1e-4 and long[2048] > 0.3


def test_one_slow_mode_decays_as_exp_minus_dt_t_over_two():
    """With one mode (state size 2: A = -1/2 + 0i) and one step size, |K[l]| = c exp(-dt l / 2): the share beyond lag
    m of a kernel truncated at L is (q^m - q^L) / (1 - q^L) with q = exp(-dt / 2)."""
    dt, length = 1e-3, 4096
    share = ssm_reach.kernel_share_beyond(dt, dt, [1000], channels=1, state_size=2, length=length)
    q = math.exp(-dt / 2)
    assert share[1000] == pytest.approx((q**1000 - q**length) / (1 - q**length), rel=1e-6)
