"""Exponential moving average of parameters ("Polyak averaging", EMA of weights).

``avg ← decay · avg + (1 - decay) · params`` after each optimizer step; the average
starts as a copy of the params. This is torch's ``AveragedModel`` with
``get_ema_multi_avg_fn(decay)`` and optax's ``ema(decay, debias=False)`` applied to
params.

>>> import numpy as np, polyopt
>>> w = np.array([0.0])
>>> ema = polyopt.EMA(w, decay=0.5)
>>> w[...] = 4.0; ema.update(w)
>>> ema.averaged            # 0.5 · 0 + 0.5 · 4
array([2.])
>>> _ = ema.copy_to(w); w   # load the average into the model's arrays
array([2.])
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _tree, _validate, _xp


class EMAState(NamedTuple):
    """The functional EMA's state.

    Attributes:
        count: updates so far (a Python int; a 0-d int32 array for JAX).
        averaged: the averaged params, in the params' structure.
    """

    count: Any
    averaged: Any


def _check_decay(decay: Any) -> float:
    _validate.in_range("decay", decay, 0.0, 1.0, closed=True)
    return float(decay)


class ema:
    """Functional EMA: ``state = ema(decay).init(params)``; ``state = e.update(params, state)``.

    Pure, like the functional optimizers: nothing is mutated, so it runs under
    ``jax.jit``.

    Args:
        decay: the weight of the old average, in [0, 1] (0: the average is the last
            params; 1: it stays the initial params).
    """

    def __init__(self, decay: float = 0.999):
        self.decay = _check_decay(decay)

    def init(self, params: Any) -> EMAState:
        """The initial state: a copy of ``params`` as the average, count 0.

        Args:
            params: one array, a list/tuple, a dict, or any structure the optimizers
                take (not parameter groups).

        Returns:
            EMAState: ``(count, averaged)``.
        """
        leaves, structure = _tree.flatten(params)
        if not leaves:
            raise ValueError("params must contain at least one array, got an empty structure")
        xp = _xp.namespace(leaves, "params")
        avg = [_xp.copy(xp, p) for p in leaves]
        count = xp.asarray(0, dtype=xp.int32) if _xp.is_jax(xp) else 0
        return EMAState(count, _tree.unflatten(structure, avg))

    def update(self, params: Any, state: EMAState) -> EMAState:
        """One EMA step: ``avg ← decay · avg + (1 - decay) · params``, in at least
        float32 for half-precision params, stored in their dtype.

        Args:
            params: the current params, in the structure ``init`` was given, each with
                the shape and dtype it had there.
            state: the state from :meth:`init` or the previous :meth:`update`.

        Returns:
            EMAState: the new state (``count`` + 1); ``state`` is not changed.
        """
        avg_leaves, structure = _tree.flatten(state.averaged)
        leaves = _tree.flatten_like(params, structure, "params", "the averaged params")
        xp = _xp.namespace(leaves + avg_leaves, "params and averaged params")
        for i, (p, a) in enumerate(zip(leaves, avg_leaves)):
            if tuple(p.shape) != tuple(a.shape) or p.dtype != a.dtype:
                where = structure.paths("params")[i]
                raise ValueError(
                    f"{where} has shape {tuple(p.shape)} and dtype {p.dtype}, "
                    f"expected {tuple(a.shape)} and {a.dtype} as when the EMA began"
                )
        d = self.decay
        with _xp.no_grad(xp):
            new = []
            for p, a in zip(leaves, avg_leaves):
                cdt = _xp.compute_dtype(xp, p.dtype)
                a_c, p_c = xp.astype(a, cdt), xp.astype(p, cdt)
                new.append(_xp.as_array(xp, xp.astype(d * a_c + (1 - d) * p_c, p.dtype)))
        return EMAState(state.count + 1, _tree.unflatten(structure, new))


class EMA:
    """Stateful EMA of a params structure (NumPy, CuPy, torch, JAX arrays alike).

    ``update(params)`` after each optimizer step; :attr:`averaged` holds the average in
    the params' structure; :meth:`copy_to` writes it into the model's arrays (in place,
    or returns the new arrays for JAX).

    Args:
        params: the params to average (any structure the optimizers take); the average
            starts as a copy of them.
        decay: the weight of the old average, in [0, 1].
    """

    def __init__(self, params: Any, decay: float = 0.999):
        self._ema = ema(decay)
        self._state = self._ema.init(params)
        self._state = self._state._replace(count=0)

    @property
    def decay(self) -> float:
        """The decay (a float in [0, 1])."""
        return self._ema.decay

    @property
    def averaged(self) -> Any:
        """The averaged params, in the params' structure (the EMA's own arrays)."""
        return self._state.averaged

    @property
    def count(self) -> int:
        """The number of :meth:`update` calls so far."""
        return int(self._state.count)

    def update(self, params: Any) -> None:
        """One EMA step with the current params (call it after each optimizer step).

        Args:
            params: the params, in the structure the EMA was made with.
        """
        self._state = self._ema.update(params, self._state)

    def copy_to(self, params: Any) -> Any:
        """Write the average into ``params`` (in place where the library allows).

        Args:
            params: the model's arrays, in the structure the EMA was made with.

        Returns:
            ``params`` itself (written in place) for NumPy, CuPy and torch; for JAX,
            whose arrays are immutable, the averaged arrays in ``params``' structure.
        """
        avg_leaves, structure = _tree.flatten(self._state.averaged)
        leaves = _tree.flatten_like(params, structure, "params", "the averaged params")
        xp = _xp.namespace(leaves, "params")
        if not _xp.writable(xp):
            return _tree.unflatten(structure, list(avg_leaves))
        with _xp.no_grad(xp):
            for dst, src in zip(leaves, avg_leaves):
                _xp.write_into(xp, dst, src)
        return params

    def state_dict(self) -> dict:
        """A snapshot for checkpoints.

        Returns:
            dict: ``{"decay", "count", "averaged": [array, ...]}``, the arrays copies in
            the params' library, in flattening order.
        """
        leaves, _ = _tree.flatten(self._state.averaged)
        xp = _xp.namespace(leaves, "averaged")
        return {
            "decay": self.decay,
            "count": self.count,
            "averaged": [_xp.copy(xp, a) for a in leaves],
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a :meth:`state_dict` snapshot; it is checked before anything changes.

        Args:
            sd: a dict from :meth:`state_dict` (its arrays are copied, in the params'
                library and dtype).

        Raises:
            ValueError: the number or shapes of the arrays, the decay or the count do
                not fit.
        """
        leaves, structure = _tree.flatten(self._state.averaged)
        saved = sd["averaged"]
        if len(saved) != len(leaves):
            raise ValueError(
                f"state_dict['averaged'] has {len(saved)} arrays, expected {len(leaves)}"
            )
        for i, (a, b) in enumerate(zip(saved, leaves)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"state_dict['averaged'][{i}] has shape {tuple(a.shape)}, "
                    f"expected {tuple(b.shape)}"
                )
        xp = _xp.namespace(leaves, "averaged")
        decay = _check_decay(sd["decay"])
        count = sd["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state_dict['count'] must be an int >= 0, got {count!r}")
        new = [_xp.copy(xp, xp.asarray(a, dtype=b.dtype)) for a, b in zip(saved, leaves)]
        self._ema = ema(decay)
        self._state = EMAState(count, _tree.unflatten(structure, new))
