"""Learning-rate (and weight-decay) schedules: functions of the step count ``k``.

The k-th call of ``step`` / ``update`` (k = 0, 1, ...) uses ``schedule(k)``: the same
value torch's scheduler gives after k ``scheduler.step()`` calls. ``k`` may be a Python
int (the value is computed on the host in float64) or a 0-d integer array (array-API
operations, so a schedule works under ``jax.jit`` with the step count in the state).

>>> from polyopt import schedules
>>> s = schedules.join([schedules.linear_warmup(0.1, 5), schedules.cosine(0.1, 100)], [5])
>>> [round(s(k), 4) for k in (0, 1, 5, 55, 105)]   # warmup, then cos(0), cos(π/2), cos(π)
[0.0, 0.02, 0.1, 0.05, 0.0]

Any callable ``k -> value`` works as a schedule; these are the common ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _validate as v
from ._xp import is_python_scalar

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "cosine_warm_restarts",
    "exponential",
    "join",
    "linear",
    "linear_warmup",
    "normalized_weight_decay",
    "step_decay",
]


class _Host:
    """Scalar math for a Python-int step count: float64 on the host."""

    cos, floor, log = staticmethod(math.cos), staticmethod(math.floor), staticmethod(math.log)

    @staticmethod
    def where(cond, a, b):
        return a if cond else b

    @staticmethod
    def minimum(a, b):
        return min(a, b)

    @staticmethod
    def to_float(k):
        return float(k)

    @staticmethod
    def const(x):
        return float(x)


class _Array:
    """The same operations on 0-d arrays (the step count under jit)."""

    def __init__(self, k: Any):
        import array_api_compat

        self.xp = xp = array_api_compat.array_namespace(k)
        self.dtype = xp.asarray(1.0).dtype  # the library's default float (float32 for JAX x32)
        self.cos, self.floor, self.log = xp.cos, xp.floor, xp.log

    def where(self, cond, a, b):
        xp = self.xp
        return xp.where(cond, xp.asarray(a, dtype=self.dtype), xp.asarray(b, dtype=self.dtype))

    def minimum(self, a, b):
        xp = self.xp
        return xp.minimum(xp.asarray(a, dtype=self.dtype), xp.asarray(b, dtype=self.dtype))

    def to_float(self, k):
        return self.xp.astype(k, self.dtype)

    def const(self, x):
        return self.xp.asarray(x, dtype=self.dtype)


def _ops(k: Any):
    if is_python_scalar(k):
        if isinstance(k, float) and not k.is_integer():
            raise ValueError(f"step count k must be an integer, got {k!r}")
        return _Host
    return _Array(k)


class Schedule:
    """Base class: subclasses define ``value(k, m)`` with ``m`` the scalar math in use.

    Every schedule is called with the step count: ``schedule(k)``.
    """

    def __call__(self, k: Any) -> Any:
        """The value at step ``k``.

        Args:
            k: the step count, a Python int >= 0 (or a float holding one), or a 0-d
                integer array (the step count in a JAX state, traced under ``jax.jit``).

        Returns:
            A Python float (float64 math on the host) for an int ``k``; a 0-d array of
            ``k``'s library in its default float dtype for an array ``k``.
        """
        return self.value(k, _ops(k))

    def value(self, k: Any, m: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class constant(Schedule):
    """``lr`` at every step (torch: no scheduler).

    Args:
        lr: the value (>= 0).
    """

    lr: float

    def __post_init__(self):
        v.at_least("lr", self.lr, 0.0, schedulable=False)

    def value(self, k, m):
        return m.const(self.lr)


@dataclass(frozen=True)
class step_decay(Schedule):
    """``lr · gamma^floor(k / step_size)`` (torch ``StepLR``).

    Args:
        lr: the value at step 0 (>= 0).
        step_size: the number of steps between decays, an int >= 1.
        gamma: the factor applied every ``step_size`` steps (>= 0).
    """

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        v.at_least("lr", self.lr, 0.0, schedulable=False)
        _positive_int("step_size", self.step_size)
        v.at_least("gamma", self.gamma, 0.0, schedulable=False)

    def value(self, k, m):
        return self.lr * self.gamma ** m.to_float(k // self.step_size)


@dataclass(frozen=True)
class exponential(Schedule):
    """``lr · gamma^k`` (torch ``ExponentialLR``).

    Args:
        lr: the value at step 0 (>= 0).
        gamma: the factor applied at every step (>= 0).
    """

    lr: float
    gamma: float

    def __post_init__(self):
        v.at_least("lr", self.lr, 0.0, schedulable=False)
        v.at_least("gamma", self.gamma, 0.0, schedulable=False)

    def value(self, k, m):
        return self.lr * self.gamma ** m.to_float(k)


def _cosine(lr: float, eta_min: float, frac: Any, m: Any) -> Any:
    return eta_min + (lr - eta_min) * (1 + m.cos(math.pi * frac)) / 2


@dataclass(frozen=True)
class cosine(Schedule):
    """``eta_min + (lr - eta_min)(1 + cos(π k / T_max)) / 2`` (torch ``CosineAnnealingLR``).

    Like torch's, the curve goes on past ``T_max`` (it rises again, period 2·T_max); join
    it with :func:`constant` to hold ``eta_min`` (optax's ``cosine_decay_schedule`` holds).

    Args:
        lr: the value at step 0 (>= 0).
        T_max: the number of steps from ``lr`` down to ``eta_min``, an int >= 1.
        eta_min: the value at ``T_max`` (>= 0).
    """

    lr: float
    T_max: int
    eta_min: float = 0.0

    def __post_init__(self):
        v.at_least("lr", self.lr, 0.0, schedulable=False)
        _positive_int("T_max", self.T_max)
        v.at_least("eta_min", self.eta_min, 0.0, schedulable=False)

    def value(self, k, m):
        return _cosine(self.lr, self.eta_min, m.to_float(k) / self.T_max, m)


@dataclass(frozen=True)
class cosine_warm_restarts(Schedule):
    """SGDR (Loshchilov & Hutter, 2017), torch ``CosineAnnealingWarmRestarts``.

    The i-th period lasts ``T_0 · T_mult^i`` steps; within it the lr follows a cosine
    from ``lr`` down towards ``eta_min`` and restarts at ``lr``.

    Args:
        lr: the value at the start of every period (>= 0).
        T_0: the length of the first period in steps, an int >= 1.
        T_mult: the factor by which each period is longer than the last, an int >= 1.
        eta_min: the value the cosine falls towards (>= 0).
    """

    lr: float
    T_0: int
    T_mult: int = 1
    eta_min: float = 0.0

    def __post_init__(self):
        v.at_least("lr", self.lr, 0.0, schedulable=False)
        _positive_int("T_0", self.T_0)
        _positive_int("T_mult", self.T_mult)
        v.at_least("eta_min", self.eta_min, 0.0, schedulable=False)

    def value(self, k, m):
        T_0, T_mult = self.T_0, self.T_mult
        if m is _Host:  # exact integer arithmetic on the host
            T_i = T_0
            while k >= T_i:
                k, T_i = k - T_i, T_i * T_mult
            return _cosine(self.lr, self.eta_min, k / T_i, m)
        kf = m.to_float(k)
        if T_mult == 1:
            T_cur, T_i = kf - T_0 * m.floor(kf / T_0), T_0
        else:

            def start(n):  # first step of period n
                return T_0 * (T_mult**n - 1) / (T_mult - 1)

            n = m.floor(m.log(kf / T_0 * (T_mult - 1) + 1) / math.log(T_mult))
            # log() may round across a period boundary in float32: correct by one
            n = m.where(kf >= start(n + 1), n + 1, n)
            n = m.where(kf < start(n), n - 1, n)
            T_cur, T_i = kf - start(n), T_0 * T_mult**n
        return _cosine(self.lr, self.eta_min, T_cur / T_i, m)


@dataclass(frozen=True)
class linear(Schedule):
    """From ``start`` to ``end`` linearly over ``steps`` steps, then ``end``.

    torch's ``LinearLR(start_factor, end_factor, total_iters)`` on base lr ``α`` is
    ``linear(α · start_factor, α · end_factor, total_iters)``.

    >>> from polyopt import schedules
    >>> s = schedules.linear(1e-3, 1e-4, steps=10)   # start, end, steps: all three needed
    >>> round(s(0), 6), round(s(5), 6), round(s(10), 6), round(s(99), 6)
    (0.001, 0.00055, 0.0001, 0.0001)

    Args:
        start: the value at step 0 (>= 0).
        end: the value from step ``steps`` on (>= 0).
        steps: the length of the ramp, an int >= 1.
    """

    start: float
    end: float
    steps: int

    def __post_init__(self):
        v.at_least("start", self.start, 0.0, schedulable=False)
        v.at_least("end", self.end, 0.0, schedulable=False)
        _positive_int("steps", self.steps)

    def value(self, k, m):
        frac = m.minimum(m.to_float(k), float(self.steps)) / self.steps
        return self.start + (self.end - self.start) * frac


def linear_warmup(lr: float, warmup_steps: int, start_factor: float = 0.0) -> linear:
    """Linear warmup from ``lr · start_factor`` to ``lr`` over ``warmup_steps`` steps.

    Args:
        lr: the value reached at step ``warmup_steps`` and kept after it (>= 0).
        warmup_steps: the length of the warmup, an int >= 1.
        start_factor: the value at step 0 as a fraction of ``lr`` (>= 0).

    Returns:
        linear: ``linear(lr · start_factor, lr, warmup_steps)``; :class:`join` it with
        another schedule to decay after the warmup.
    """
    v.at_least("lr", lr, 0.0, schedulable=False)
    _positive_int("warmup_steps", warmup_steps)
    v.at_least("start_factor", start_factor, 0.0, schedulable=False)
    return linear(lr * start_factor, lr, warmup_steps)


@dataclass(frozen=True)
class join(Schedule):
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` counted from 0,
    and so on (torch ``SequentialLR`` with ``milestones``; optax ``join_schedules``).

    Args:
        schedules: the schedules (callables of the step count), one more than
            ``boundaries``; each counts its steps from 0 where it starts.
        boundaries: the steps at which the next schedule takes over, increasing ints
            >= 0.
    """

    schedules: Sequence[Callable]
    boundaries: Sequence[int]

    def __post_init__(self):
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(
                f"join needs one boundary fewer than schedules, got {len(self.schedules)} "
                f"schedules and boundaries={list(self.boundaries)}"
            )
        if any(not callable(s) for s in self.schedules):
            raise TypeError(
                f"schedules must be callables of the step count, got {self.schedules!r}"
            )
        b = list(self.boundaries)
        if (
            any(isinstance(x, bool) or not isinstance(x, int) for x in b)
            or b != sorted(b)
            or (b and b[0] < 0)
        ):
            raise ValueError(f"boundaries must be increasing ints >= 0, got {b}")

    def value(self, k, m):
        starts = (0, *self.boundaries)
        if m is _Host:
            i = sum(k >= b for b in self.boundaries)
            return float(self.schedules[i](k - starts[i]))
        out = self.schedules[0](k)
        for start, s in zip(self.boundaries, self.schedules[1:]):
            out = m.where(k >= start, s(k - start), out)
        return out


def normalized_weight_decay(
    lambda_norm: float, batch_size: int, dataset_size: int, epochs: int
) -> float:
    """The AdamW paper's normalized weight decay: ``λ = λ_norm · sqrt(b / (B · T))``.

    ``b`` is the batch size, ``B`` the number of training points, ``T`` the number of
    epochs (Loshchilov & Hutter 2019, appendix B.1). The paper's λ multiplies the
    schedule multiplier η_t only; polyopt (like torch) multiplies the decay by the
    whole lr, so pass ``weight_decay=normalized_weight_decay(...) / lr``.

    >>> round(normalized_weight_decay(0.05, 128, 50_000, 100), 6)   # 0.05 · sqrt(128 / 5e6)
    0.000253

    Args:
        lambda_norm: the paper's normalized decay λ_norm (>= 0).
        batch_size: b, an int >= 1.
        dataset_size: B, the number of training points, an int >= 1.
        epochs: T, an int >= 1.

    Returns:
        float: λ, the paper's (unnormalized) weight decay.

    """
    v.at_least("lambda_norm", lambda_norm, 0.0, schedulable=False)
    for name, n in (("batch_size", batch_size), ("dataset_size", dataset_size), ("epochs", epochs)):
        _positive_int(name, n)
    return lambda_norm * math.sqrt(batch_size / (dataset_size * epochs))
