"""The flat layout: views into one buffer, recognised again by span()."""

import pickle

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


# -- Packed: a tuple-like sequence over buffers (the flat layout for JAX) --------------

SHAPES = [(2, 3), (), (0,), (4,)]


def _packed():
    """Elements 0..3 in one buffer, then an array as it is, then None."""
    buf = np.arange(11.0)
    loose = np.full((2,), -1.0)
    return flat.Packed.join([flat.Packed.run(buf, SHAPES), (loose, None)]), buf, loose


def test_packed_reads_like_the_tuple_it_stands_for():
    s, buf, loose = _packed()
    want = (buf[:6].reshape(2, 3), buf[6].reshape(()), buf[7:7], buf[7:11], loose, None)
    assert len(s) == len(want) == 6
    for i, w in enumerate(want):
        for got in (s[i], s[i - len(s)], list(s)[i]):
            if w is None:
                assert got is None
            else:
                assert got.shape == w.shape and np.array_equal(got, w), i
    with pytest.raises(IndexError, match="index 6 out of range for 6"):
        s[6]
    assert s.describe() == [(w.shape, w.dtype) if w is not None else None for w in want]
    assert flat.describe((loose, None)) == [((2,), loose.dtype), None]
    assert repr(s) == "Packed(6 arrays, 1 buffer(s))"


def test_packed_slices_keep_whole_buffers_and_copy_out_partial_ones():
    s, buf, loose = _packed()
    assert s[0:6] is s
    whole = s[0:5]  # the buffer and the loose array
    assert whole.parts[0] is buf and whole.parts[1] is loose and len(whole) == 5
    part = s[1:3]  # inside the buffer: elements of their own
    assert part.tails == (None, None) and len(part) == 2  # no buffer shared
    assert np.array_equal(part[0], buf[6].reshape(()))
    assert [tuple(a.shape) for a in s[::2][:2]] == [(2, 3), (0,)]
    run = flat.Packed.run(buf, SHAPES)
    assert run.parts == (buf,) and run.tails == (tuple(SHAPES),)


def test_packed_pickles():
    s, _, _ = _packed()
    back = pickle.loads(pickle.dumps(s))
    assert back.tails == s.tails
    for a, b in zip(back, s):
        assert (a is None and b is None) or np.array_equal(a, b)
