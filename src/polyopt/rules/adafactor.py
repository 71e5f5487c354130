"""Adafactor (Shazeer & Stern, 2018) as ``torch.optim.Adafactor``: a factored second
moment (row and column running means) for arrays of 2 or more dimensions, a full one
for vectors and scalars, relative step size and per-array update clipping.

The state of a factored array does not have the param's shape (``row_var`` is
``p.shape[:-1] + (1,)``, ``col_var`` is ``p.shape[:-2] + (1,) + p.shape[-1:]``), and
which slots an array has depends on its number of dimensions, as in torch's
``optimizer.state[p]``. The engine's generic state checks assume one slot set per
group, each slot of the param's shape; :class:`_FactoredOptimizer` is the shim that
asks this module's :func:`layout` instead (see its docstring).
"""

from __future__ import annotations

import math
from typing import Any

from .. import _validate as v
from .. import _xp
from .._base import Optimizer, Rule, scalar_sqrt
from ._common import grad_term, param_term

DEFAULTS = dict(
    lr=1e-2,
    beta2_decay=-0.8,
    eps=(None, 1e-3),
    d=1.0,
    weight_decay=0.0,
    maximize=False,
)

SLOTS = ("row_var", "col_var", "variance")  # torch's order in state[p]


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    b = v.number("beta2_decay", hp["beta2_decay"])
    if b is not None and not b <= 0.0:  # also rejects NaN
        raise ValueError(f"beta2_decay must be <= 0, got {hp['beta2_decay']!r}")
    eps1, eps2 = hp["eps"]
    if eps1 is not None:
        v.at_least("eps[0]", eps1, 0.0, schedulable=False)
    v.at_least("eps[1]", eps2, 0.0, schedulable=False)
    v.at_least("d", hp["d"], 1.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return SLOTS  # each array uses two (factored) or one of them: see layout()


def layout(shape: tuple[int, ...], hp: dict | None = None) -> dict[str, tuple[int, ...] | None]:
    """The shape of each slot for a param of ``shape`` (None: the array has no such
    slot). Factored over the last two axes for ``len(shape) >= 2``, as torch."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return {
            "row_var": shape[:-1] + (1,),
            "col_var": shape[:-2] + (1,) + shape[-1:],
            "variance": None,
        }
    return {"row_var": None, "col_var": None, "variance": shape}


def _init(p: Any, hp: dict, xp: Any) -> dict:
    if _xp.float_kind(xp, p.dtype) == "complex":
        raise TypeError(
            f"adafactor does not take complex params (got an array of shape "
            f"{tuple(p.shape)} and dtype {p.dtype}): its factored second moment has no "
            "meaning for a pair of reals, and torch.optim.Adafactor refuses them too; pass "
            "the real and imaginary parts as separate real arrays if that is what you want"
        )
    # each slot as zeros_like of the reduction the step takes, not xp.zeros(shape,
    # device=...): a JAX array keeps the placement JAX gives that reduction (a factored
    # slot cannot take a param's sharding over the axis it reduces, and an uncommitted
    # param keeps uncommitted state, so jit does not compile again on the second step)
    if p.ndim >= 2:
        return {
            "row_var": xp.zeros_like(xp.sum(p, axis=-1, keepdims=True), dtype=p.dtype),
            "col_var": xp.zeros_like(xp.sum(p, axis=-2, keepdims=True), dtype=p.dtype),
            "variance": None,
        }
    return {"row_var": None, "col_var": None, "variance": xp.zeros_like(p)}


def _rms(x: Any, n: int, xp: Any) -> Any:
    """Root mean square of all of ``x`` (a 0-d array): ``‖x‖₂ / sqrt(n)`` as torch.

    The norm is the library's own ``linalg.vector_norm`` where it has the extension (one
    pass and no temporary in torch, whose Adafactor takes the same norm; NumPy's is
    ``sqrt(sum(x*x))``), else ``sqrt(sum(x * x))``."""
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "vector_norm"):
        return linalg.vector_norm(x) / math.sqrt(n)
    return xp.sqrt(xp.sum(x * x)) / math.sqrt(n)


def _min(a: Any, b: Any, xp: Any) -> Any:
    """min(a, b) of two numbers, or of a number and a 0-d array, or of two 0-d arrays."""
    if _xp.is_python_scalar(a) and _xp.is_python_scalar(b):
        return min(a, b)
    if _xp.is_python_scalar(a):
        return xp.clip(b, max=a)
    return xp.clip(a, max=b)


#: params of at least this many elements check whether the clamp of ``sqrt(V)`` can
#: act before running it (the check costs about a clamp of this size)
CHECK_CLAMP_FROM = 1 << 15


def _at_least(sr: Any, sc: Any, eps1: float, n: int, xp: Any) -> bool:
    """Whether every ``sr_i · sc_j`` is known to be >= ``eps1``, so that clamping their
    product (``n`` numbers) at ``eps1`` would change nothing: min(sr) · min(sc) >= eps1
    (rounding is monotone), read where that costs no device sync (NumPy, CPU torch).
    False when unknown (jit, a GPU), for small arrays, and for NaN."""
    if n < CHECK_CLAMP_FROM:
        return False
    bound = _xp.host_value(xp.asarray(xp.min(sr) * xp.min(sc)))
    return bound is not None and bound >= eps1


def _lerp(old: Any, new: Any, w: Any) -> Any:
    """``old + w (new - old)``: torch's ``lerp_`` (exactly ``new`` at w = 1, step one)."""
    return old + w * (new - old)


def _step(p, g, s, hp, t, xp):
    n = math.prod(p.shape)
    if n == 0:  # nothing to update (torch raises ZeroDivisionError on an empty param)
        return p, dict(s)
    eps1, eps2 = hp["eps"]
    if eps1 is None:  # a direct call; the engine resolves it first (_for_dtype)
        eps1 = float(xp.finfo(p.dtype).eps)
    g = grad_term(p, g, hp, decoupled=True)  # -g for maximize; no L2 term
    w = t ** hp["beta2_decay"]  # 1 - beta2_t
    rho = _min(hp["lr"], 1 / scalar_sqrt(t, xp), xp)
    alpha = xp.clip(_rms(p, n, xp), min=eps2) * rho  # from p before the decay, as torch
    p = param_term(p, hp, decoupled=True)  # p - lr·λ·p
    g2 = g * g
    if p.ndim >= 2:
        row = _lerp(s["row_var"], xp.mean(g2, axis=-1, keepdims=True), w)
        col = _lerp(s["col_var"], xp.mean(g2, axis=-2, keepdims=True), w)
        del g2  # a temporary the size of p: free it before the next one
        new_s = {"row_var": row, "col_var": col}
        # V = R ⊗ C / r (r: the row mean) and sqrt(max(V, ε1²)) = max(sqrt(V), ε1), with
        # sqrt(V) = sqrt(R/r) ⊗ sqrt(C): the square roots and the division by r on the
        # m + n numbers of the factors, then one product the size of p and its clamp
        # (torch: the product, then a division, a clamp and rsqrt over it)
        r = xp.clip(xp.mean(row, axis=-2, keepdims=True), min=eps1)
        sr, sc = xp.sqrt(row / r), xp.sqrt(col)
        root = sr * sc
        if not _at_least(sr, sc, eps1, n, xp):
            root = xp.clip(root, min=eps1)
        u = g / root
    else:
        var = _lerp(s["variance"], g2, w)
        new_s = {"variance": var}
        u = g / xp.sqrt(xp.clip(var, min=eps1 * eps1))
    denom = xp.clip(_rms(u, n, xp) / hp["d"], min=1.0)
    return p - (alpha / denom) * u, new_s


def _for_dtype(hp: dict, dtype: Any, xp: Any) -> dict:
    """``eps=(None, ε2)``: torch's ε1, the eps of the param's own dtype (float16: 9.8e-4,
    though the step computes in float32)."""
    eps1, eps2 = hp["eps"]
    if eps1 is not None:
        return hp
    return {**hp, "eps": (_dtype_eps(xp, dtype), eps2)}


def _dtype_eps(xp: Any, dtype: Any) -> float:
    try:
        return float(xp.finfo(dtype).eps)
    except (TypeError, ValueError):  # NumPy arrays of ml_dtypes.bfloat16
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)


ADAFACTOR = Rule(
    "adafactor",
    DEFAULTS,
    _check,
    _slots,
    _step,
    init=_init,
    elementwise=False,
    layout=layout,
    for_dtype=_for_dtype,
)


def adafactor(
    lr: float | Any = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float | Any = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Adafactor (Shazeer & Stern, 2018), as ``torch.optim.Adafactor``.

    With :math:`g_t` the gradient (negated if ``maximize``), t the array's update count,
    γ = ``lr`` (or ``lr(k)``), λ = ``weight_decay``, (ε1, ε2) = ``eps``, τ =
    ``beta2_decay``, RMS(x) = ‖x‖₂ / sqrt(x.size)::

        w_t  = t^τ                                        (1 - β2_t)
        ρ_t  = min(γ, 1/sqrt(t));   α_t = max(ε2, RMS(p_{t-1})) · ρ_t
        p    = p_{t-1} - γ λ p_{t-1}                       (decoupled; skipped if λ = 0)
        ndim >= 2, factored over the last two axes (rows i, columns j):
          R_t = R_{t-1} + w_t (mean_j g_t² - R_{t-1})      row_var,  shape (..., m, 1)
          C_t = C_{t-1} + w_t (mean_i g_t² - C_{t-1})      col_var,  shape (..., 1, n)
          V_t = R_t C_t / max(mean_i R_t, ε1)
        ndim <= 1:
          V_t = V_{t-1} + w_t (g_t² - V_{t-1})             variance, p's shape
        U_t  = g_t / sqrt(max(V_t, ε1²))
        p_t  = p - α_t / max(1, RMS(U_t) / d) · U_t

    ``eps[0] = None`` (the default) is ``finfo(p.dtype).eps`` of each param's own dtype
    (torch's default; float16 params: 9.8e-4, not float32's 1.2e-7, though the math
    runs in float32). Defaults are torch's: ``lr=1e-2``, ``beta2_decay=-0.8``,
    ``eps=(None, 1e-3)``, ``d=1.0``, ``weight_decay=0.0``. torch's ``foreach`` is an
    implementation choice: here ``impl``, and only the generic path exists (the step
    reduces over the array, so no elementwise kernel applies).

    Differences from torch: a param with no elements is left as it is (torch raises
    ZeroDivisionError); with ``eps[0] = None`` and params of several dtypes in one
    group, torch uses the first param's dtype for all of them, polyopt each param's
    own compute dtype; RMS(p) and RMS(U) stay on the device (torch reads them to the host, one sync
    each per array). Complex params are refused at ``init`` (torch refuses them at
    ``step``). A factored array's ``1/sqrt(max(V, ε1²))`` is computed as
    ``1 / max(sqrt(R/r) ⊗ sqrt(C), ε1)`` (square roots of the factors, then one product
    and one clamp the size of the array; the clamp skipped where the factors' minima
    show it cannot act): equal to torch's within rounding, but where torch's product
    ``R ⊗ C`` overflows (float32 gradients of ~1e10) or its ε1² underflows to 0, this
    keeps finite values.

    Conventions elsewhere: the paper (and optax's ``adafactor``, Hugging Face's
    ``Adafactor``) add ε1 = 1e-30 to g² inside both factors, use ρ_t = min(0.01,
    1/sqrt(t)) with no lr, and decay β2_t = 1 - t^-0.8 the same way; optax factors
    the two largest axes (and only when both are >= ``min_dim_size_to_factor`` = 128)
    rather than the last two, and has momentum off by default as here. torch's lr is
    the cap of ρ_t, not a multiplier on the step; λ is multiplied by lr.

    State per array: ``row_var`` and ``col_var`` (ndim >= 2) or ``variance`` (ndim <= 1):
    for an (m, n) matrix m + n numbers instead of Adam's 2 m n.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``. torch's convention: the cap
            of the relative step size ρ_t, not a multiplier on the step.
        beta2_decay: τ (<= 0): the second-moment decay rate is 1 − β2_t = t^τ.
        eps: (ε1, ε2): ε1 (>= 0, or None for the eps of each param's own dtype) floors the
            second-moment estimate; ε2 (>= 0) floors the RMS of the param in the step size.
        d: (>= 1): the clipping threshold of the update's RMS.
        weight_decay: λ (>= 0), decoupled and multiplied by lr: ``p ← p − γ λ p`` before the
            step. A number, a 0-d array or a schedule.
        maximize: ascend the objective instead of descending it (the gradient is negated).
        impl: which implementation runs the step. This rule reduces over each array, so only
            the generic path exists: ``"auto"`` (default) and ``"generic"`` run the rule as
            written (array-API operations, one array at a time); ``"fused"`` raises
            ValueError at ``init`` / ``update`` (there is no fused step to require).

    Returns:
        Optimizer: the functional form, a pure ``init`` / ``update`` pair;
            ``polyopt.Adafactor(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> from polyopt import adafactor
    >>> opt = adafactor(lr=0.5)
    >>> params = {"w": np.ones((2, 3)), "b": np.array([3.0, -4.0])}
    >>> state = opt.init(params)
    >>> [tuple(state.slots[k][1].shape) for k in ("row_var", "col_var")]  # params["w"]
    [(2, 1), (1, 3)]
    >>> params, state = opt.update(params, {"w": np.ones((2, 3)), "b": np.ones(2)}, state)
    >>> params["b"]   # step one: U = sign(g), α = RMS(b) · min(0.5, 1) = 3.5355 · 0.5
    array([ 1.23223305, -5.76776695])

    Paper: https://arxiv.org/abs/1804.04235
    """
    hp = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay)
    return Optimizer(ADAFACTOR, {**hp, "maximize": maximize}, impl)
