"""Precision choices the docs promise (docs/numerics.md)."""

from __future__ import annotations

import numpy as np
import pytest

import polyopt
from polyopt._base import bias_correction


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("t", [1, 2, 3, 10, 100, 10_000])
def test_bias_correction_on_array_steps_keeps_float32_accuracy(beta, t):
    """Under jit the step count is an array; 1 - beta**t must not cancel in float32."""
    exact = 1 - beta**t  # float64 on the host
    got = float(bias_correction(beta, np.asarray(t, dtype=np.float32), np))
    assert abs(got - exact) <= 4e-7 * exact  # a few float32 ulps, relative


def test_half_precision_params_compute_in_float32_and_stay_half():
    p = np.full(4, 1000.0, dtype=np.float16)
    opt = polyopt.adam(lr=1.0)
    new, state = opt.update(p, np.full(4, 300.0, dtype=np.float16), opt.init(p))
    assert new.dtype == np.float16 and state.slots["exp_avg_sq"][0].dtype == np.float16
    # g² = 9e4 overflows float16 (max 65504) if squared in half precision; in float32 the
    # first Adam step is lr · sign(g) exactly
    np.testing.assert_array_equal(new, np.float16(999.0))
