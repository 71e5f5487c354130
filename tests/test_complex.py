"""Complex parameters, with torch.optim's semantics: a complex array is a pair of reals
(``torch.view_as_real``). So ``|g|²`` in Adam's second moment is per part (``re²`` and
``im²`` in the two parts of ``exp_avg_sq``), not the complex square; the state is kept
complex like the param; Adagrad's ``initial_accumulator_value`` fills both parts, as
torch's does.

- Against ``torch.optim`` in complex128 (rtol 1e-9) for every single-group case the table
  has, in the functional form (NumPy) and the stateful form (torch tensors, ``.grad``),
  with missing gradients in the mix.
- The fast paths take complex arrays as real views: the NumPy kernel runs its one flat
  launch and torch's fused kernel runs (counted), with the generic path's numbers.
- JAX (complex64 under ``jit``), array-api-strict and CuPy are in the conformance
  matrix's complex columns.
"""

from __future__ import annotations

import numpy as np
import pytest

import cases as C  # noqa: E402
import polyopt
import torch_maxdiff as T  # noqa: E402
from polyopt.backends import numpy as np_fused

torch = pytest.importorskip("torch")

STEPS = 20
TORCH_CASES = [c for c in C.CASES if T.torch_supports(c) and not c.missing]


def _problem(missing=False):
    p0, grads = C.make_problem(STEPS, complex=True)
    if missing:
        for k, gs in enumerate(grads):
            if k % 4 == 1:
                gs[2] = None
    return p0, grads


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_functional_numpy_complex128_matches_torch(case):
    # (assert_matches_torch checks every result's dtype: complex128 stays complex128)
    T.assert_matches_torch(case, T.functional_run(case), *_problem(), "numpy complex128")


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_stateful_torch_complex128_matches_torch(case):
    T.assert_matches_torch(
        case, T.stateful_torch_run(case), *_problem(missing=True), "torch complex128"
    )


def test_complex_is_pairs_of_reals_not_the_complex_square():
    # one Adam step on g = 1 + 1j: per part, both move by lr; with the complex square
    # (g² = 2j) the second moment would have a zero real part and the step would differ
    p = np.zeros(1, np.complex128)
    opt = polyopt.Adam([p], lr=0.1, eps=0.0)
    opt.step([np.array([1 + 1j])])
    np.testing.assert_allclose(p, [-0.1 - 0.1j], rtol=1e-15)
    v = opt.state.slots["exp_avg_sq"][0]
    assert v.dtype == np.complex128
    np.testing.assert_allclose(v, [0.001 + 0.001j], rtol=1e-12)


def test_a_group_mixing_real_and_complex_arrays():
    rng = np.random.default_rng(0)
    re = rng.standard_normal(4)
    cx = rng.standard_normal(3) + 1j * rng.standard_normal(3)
    g_re, g_cx = rng.standard_normal(4), rng.standard_normal(3) + 1j * rng.standard_normal(3)
    both = [re.copy(), cx.copy()]
    opt = polyopt.AdamW(both, lr=0.01)
    alone_re, alone_cx = [re.copy()], [cx.copy()]
    o1, o2 = polyopt.AdamW(alone_re, lr=0.01), polyopt.AdamW(alone_cx, lr=0.01)
    for _ in range(5):
        opt.step([g_re, g_cx])
        o1.step([g_re])
        o2.step([g_cx])
    assert np.array_equal(both[0], alone_re[0]) and np.array_equal(both[1], alone_cx[0])


def test_numpy_fused_path_runs_on_complex_arrays():
    rng = np.random.default_rng(1)
    shapes = [(5,), (2, 3)]
    p0 = [rng.standard_normal(s) + 1j * rng.standard_normal(s) for s in shapes]
    gs = [[rng.standard_normal(s) + 1j * rng.standard_normal(s) for s in shapes] for _ in range(5)]
    out = {}
    for impl in ("fused", "generic"):
        params = [p.copy() for p in p0]
        opt = polyopt.AdamW(params, lr=0.01, amsgrad=True, impl=impl)
        for g in gs:
            opt.step(g)
            if impl == "fused":
                assert np_fused.LAST_PATH in ("span", "pointers")
        out[impl] = params
    for a, b in zip(out["fused"], out["generic"], strict=True):
        assert np.array_equal(a, b)  # the kernel is bit-identical to the generic path


def test_torch_fused_kernel_runs_on_complex_tensors(monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    rng = np.random.default_rng(2)
    p0 = [rng.standard_normal(4) + 1j * rng.standard_normal(4)]
    g = [torch.tensor(rng.standard_normal(4) + 1j * rng.standard_normal(4))]
    out = {}
    for impl in ("fused", "generic"):
        params = [torch.tensor(p) for p in p0]
        opt = polyopt.AdamW(params, lr=0.01, impl=impl)
        for _ in range(3):
            opt.step(g)
        out[impl] = params[0]
    assert len(calls) == 3
    torch.testing.assert_close(out["fused"], out["generic"], rtol=1e-12, atol=0)


def test_complex_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    p = [jnp.asarray([1 + 2j, -1j], dtype=jnp.complex64)]
    opt = polyopt.adam(lr=0.1)
    state = opt.init(p)
    step = jax.jit(opt.update)
    p1, state = step(p, [jnp.asarray([1 + 1j, 2 - 1j], dtype=jnp.complex64)], state)
    assert p1[0].dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(p1[0]), [0.9 + 1.9j, -0.1 - 0.9j], rtol=1e-6)
