"""The flat layout: views into one buffer, recognised again by span()."""

import numpy as np
import pytest

import polyopt
from polyopt import flat


def test_pack_copies_values_into_one_buffer_and_span_sees_it():
    src = [np.arange(6.0).reshape(2, 3), np.ones(4), np.array(7.0), np.zeros(0)]
    packed = flat.pack(src)
    for a, b in zip(packed, src):
        assert a.shape == b.shape and np.array_equal(a, b) and a is not b
    whole = flat.span(packed)
    assert whole.shape == (11,)
    whole[:] = -1.0  # writes through to the views
    assert all(np.all(a == -1.0) for a in packed)


def test_span_refuses_what_is_not_one_run():
    a, b = flat.pack([np.ones(3), np.ones(2)])
    assert flat.span([b, a]) is None  # wrong order
    assert flat.span([np.ones(3), np.ones(3)]) is None  # two buffers
    buf = np.zeros(10)
    assert flat.span([buf[::2]]) is None  # not contiguous
    assert flat.span([buf[:3], buf[3:]]).shape == (10,)


def test_zeros_like_groups_by_dtype():
    z = flat.zeros_like([np.ones(2, np.float32), np.ones(3), np.ones(4, np.float32)])
    assert [a.dtype for a in z] == [np.float32, np.float64, np.float32]
    assert flat.span([z[0], z[2]]) is not None and all(np.all(a == 0) for a in z)


def test_optimizers_run_on_packed_params_in_place():
    p = flat.pack([np.ones((2, 2)), np.ones(3)])
    g = flat.zeros_like(p)
    g[0][...] = 1.0
    opt = polyopt.AdamW(p, lr=0.1, weight_decay=0.0)
    opt.step(g)
    np.testing.assert_allclose(p[0], 0.9)
    np.testing.assert_allclose(p[1], 1.0)
    assert flat.span(p) is not None  # still one buffer


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="at least one array"):
        flat.pack([])
