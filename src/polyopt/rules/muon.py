"""Muon (Jordan et al., 2024) as ``torch.optim.Muon``: momentum (Nesterov by default),
then the update orthogonalized by a Newton–Schulz iteration, for 2-D params only.

The step reduces (a Frobenius norm) and multiplies matrices, so the rule is not
elementwise: only the generic path runs it. The Newton–Schulz iteration runs in the
compute dtype by default (optax's choice); ``ns_dtype="bfloat16"`` reproduces torch,
which runs it in bfloat16 (see :func:`muon`).
"""

from __future__ import annotations

import math
from typing import Any

from .. import _validate as v
from .. import _xp
from .._base import Optimizer, Rule
from ._common import make, param_term

#: torch's (Keller Jordan's) quintic Newton–Schulz coefficients
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_DTYPES = ("compute", "float32", "bfloat16")

DEFAULTS = dict(
    lr=1e-3,
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    ns_coefficients=NS_COEFFICIENTS,
    eps=1e-7,
    ns_steps=5,
    # The factory's default is torch's None (= "original"); a string here tells the
    # engine that this is a choice, not a number (it would check None as a number).
    adjust_lr_fn="original",
    ns_dtype="compute",
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.at_least("momentum", hp["momentum"], 0.0, schedulable=False)
    v.flag("nesterov", hp["nesterov"])
    for i, c in enumerate(hp["ns_coefficients"]):
        x = v.number(f"ns_coefficients[{i}]", c)
        if x is not None and not math.isfinite(x):
            raise ValueError(f"ns_coefficients[{i}] must be finite, got {c!r}")
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    n = hp["ns_steps"]
    if not _is_count(n):
        raise TypeError(f"ns_steps must be an int in [0, 100), got {n!r}")
    if not 0 <= n < 100:  # torch's limit
        raise ValueError(f"ns_steps must be an int in [0, 100), got {n!r}")
    if hp["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {hp['adjust_lr_fn']!r}")
    if hp["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {hp['ns_dtype']!r}")


def _is_count(n: Any) -> bool:
    """An int, or a float holding one (a NumPy integer arrives as a float)."""
    if type(n) is int:
        return True
    return type(n) is float and n.is_integer()


def _slots(hp: dict) -> tuple[str, ...]:
    return ("momentum_buffer",)


def _bfloat16(xp: Any) -> Any:
    """The bfloat16 dtype of ``xp`` (ml_dtypes' for NumPy), or None."""
    dt = getattr(xp, "bfloat16", None)
    if dt is None and _xp.is_numpy(xp):
        try:
            import ml_dtypes
        except ImportError:
            return None
        dt = ml_dtypes.bfloat16
    return dt


def _init(p: Any, hp: dict, xp: Any) -> dict:
    if _xp.float_kind(xp, p.dtype) == "complex":
        raise TypeError(
            f"muon does not take complex params (got an array of shape {tuple(p.shape)} "
            f"and dtype {p.dtype}): the orthogonalization of a matrix has no meaning for "
            "a pair of reals, and torch.optim.Muon refuses them too"
        )
    if len(p.shape) != 2:
        raise ValueError(
            f"muon takes only 2-D params (weight matrices), got an array of shape "
            f"{tuple(p.shape)}; optimize 0-d, 1-D and higher-dimensional params (biases, "
            "gains, embeddings, conv kernels) with polyopt.adamw, as torch.optim.Muon "
            "asks (flatten a conv kernel to 2-D yourself if you mean Muon on it)"
        )
    if hp["ns_dtype"] == "bfloat16" and _bfloat16(xp) is None:
        raise TypeError(
            f"ns_dtype='bfloat16' needs a bfloat16 dtype, and {xp.__name__} has none "
            "(for NumPy, pip install ml_dtypes); use ns_dtype='compute' or 'float32'"
        )
    return {"momentum_buffer": xp.zeros_like(p)}


def _lerp(start: Any, end: Any, w: Any, xp: Any) -> Any:
    """``start + w (end - start)``, in torch's ``lerp`` form (from ``end`` for w >= 0.5,
    so that w = 1 gives ``end`` exactly)."""
    if _xp.is_python_scalar(w):
        return start + w * (end - start) if abs(w) < 0.5 else end - (end - start) * (1 - w)
    return xp.where(xp.abs(w) < 0.5, start + w * (end - start), end - (end - start) * (1 - w))


def _adjusted_lr(lr: Any, fn: str | None, shape: tuple[int, ...]) -> Any:
    """torch's ``_adjust_lr``: the lr scaled for the matrix shape ``(A, B)``."""
    a, b = shape[:2]
    if fn == "match_rms_adamw":  # Moonshot: RMS of the update as AdamW's
        return lr * (0.2 * math.sqrt(max(a, b)))
    return lr * math.sqrt(max(1, a / b))  # None / "original": Keller Jordan's


def orthogonalize(x: Any, hp: dict, xp: Any) -> Any:
    """The Newton–Schulz iteration of torch's ``_zeropower_via_newtonschulz`` on the 2-D
    array ``x``: ``X ← X / max(‖X‖_F, eps)``, then ``ns_steps`` times
    ``A = X Xᵀ; X ← a X + (b A + c A²) X``, on the wide orientation (a tall matrix is
    transposed before and after). Returns an array of ``x``'s dtype.

    ``ns_dtype``: ``"compute"``, in ``x``'s dtype; ``"float32"``, in float32; ``"bfloat16"``, as
    torch: bfloat16 values, each operation computed in float32 and rounded to bfloat16
    once (torch's bfloat16 ``matmul`` / ``addmm`` / ``norm`` / ``div`` on CPU)."""
    a, b, c = hp["ns_coefficients"]
    kind = hp["ns_dtype"]
    dtype = x.dtype
    if kind == "compute":

        def rnd(y):
            return y

    else:
        x = xp.astype(x, xp.float32)  # float64 -> bfloat16 rounds through float32, as torch
        if kind == "bfloat16":
            bf16 = _bfloat16(xp)

            def rnd(y):
                return xp.astype(xp.astype(y, bf16), xp.float32)

        else:

            def rnd(y):
                return y

    x = rnd(x)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = xp.matrix_transpose(x)
    norm = xp.clip(rnd(xp.sqrt(xp.sum(x * x))), min=hp["eps"])
    x = rnd(x / norm)
    for _ in range(int(hp["ns_steps"])):
        gram = rnd(xp.matmul(x, xp.matrix_transpose(x)))
        poly = rnd(b * gram + c * xp.matmul(gram, gram))
        x = rnd(a * x + xp.matmul(poly, x))
    if tall:
        x = xp.matrix_transpose(x)
    return xp.astype(x, dtype)


def _step(p, g, s, hp, t, xp):
    if len(p.shape) != 2:  # init refuses these; this is for direct calls of the rule
        raise ValueError(f"muon takes only 2-D params, got an array of shape {tuple(p.shape)}")
    mu = hp["momentum"]
    buf = _lerp(s["momentum_buffer"], g, 1 - mu, xp)
    u = _lerp(g, buf, mu, xp) if hp["nesterov"] else buf
    o = orthogonalize(u, hp, xp)
    lr = _adjusted_lr(hp["lr"], hp["adjust_lr_fn"], tuple(p.shape))
    p = param_term(p, hp, decoupled=True)  # p - lr·λ·p, with the lr not adjusted
    return p - lr * o, {"momentum_buffer": buf}


MUON = Rule("muon", DEFAULTS, _check, _slots, _step, init=_init, elementwise=False)


def muon(
    lr: float | Any = 1e-3,
    weight_decay: float | Any = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    ns_dtype: str = "compute",
    impl: str = "auto",
) -> Optimizer:
    r"""Muon (Jordan et al., 2024): momentum orthogonalized by Newton–Schulz, for 2-D
    params (the weight matrices of hidden layers) only.

    With :math:`g_t` the gradient, :math:`\gamma_t` the learning rate (``lr``, or
    ``lr(k)`` for a schedule), :math:`\mu` = ``momentum``, :math:`\lambda` =
    ``weight_decay`` and ``(a, b, c)`` = ``ns_coefficients``::

        B_t = B_{t-1} + (1 - μ) (g_t - B_{t-1})          (= μ B_{t-1} + (1 - μ) g_t)
        U_t = g_t + μ (B_t - g_t)  if nesterov  else  B_t
        X   = U_t / max(‖U_t‖_F, ε)                      (on U_tᵀ if U_t is tall)
        X   ← a X + (b A + c A²) X,  A = X Xᵀ            (ns_steps times)
        p_t = p_{t-1} · (1 - γ_t λ) - γ_t s(A, B) X      (p of shape (A, B))

    with ``s = sqrt(max(1, A / B))`` for ``adjust_lr_fn=None`` or ``"original"``
    (Keller Jordan's) and ``s = 0.2 sqrt(max(A, B))`` for ``"match_rms_adamw"``
    (Moonshot's: the update's RMS that of AdamW, so AdamW's lr and weight decay carry
    over). The decay is decoupled and uses γ_t, not s·γ_t. Defaults are torch's.

    This equals ``torch.optim.Muon`` but for one thing: torch runs the Newton–Schulz
    iteration in bfloat16 whatever the param's dtype; polyopt by default runs it in the
    compute dtype (``ns_dtype="compute"``: the param's, float32 for half precision), as
    optax's ``contrib.muon`` does. ``ns_dtype="bfloat16"`` reproduces torch's: bfloat16
    values, each operation computed in float32 and rounded to bfloat16 once, as torch's
    CPU kernels do (NumPy needs ml_dtypes for it); ``"float32"`` runs it in float32. A
    bfloat16 iteration keeps about 3 significant digits: torch's update is ~2e-2
    (max entry error over max entry) from the exact iteration's. Under ``jax.jit`` on
    GPU/TPU the float32 matmuls follow JAX's default matmul precision.

    Conventions elsewhere: torch's momentum buffer is an EMA, ``lerp(B, g, 1 - μ)``,
    not an SGD buffer ``μ B + g`` (the normalization removes the factor between them,
    not the different Nesterov mix). optax's
    ``contrib.muon`` bias-corrects its EMA, divides by ``‖U‖_F + ε`` (ε = 1e-8) rather
    than by ``max(‖U‖_F, ε)``, scales by ``sqrt(max(1, fan_out / fan_in))`` with
    ``fan_in`` the first axis (a JAX ``(in, out)`` kernel; torch's ``(out, in)`` weight
    gives the same ratio), and applies its own AdamW to the params that are not
    matrices. Here Muon takes matrices only (torch's choice): pair it with
    :func:`polyopt.adamw` for the rest (below). Complex params are refused at ``init``
    (torch refuses them at the first step), and so is every param that is not 2-D
    (torch refuses those in its constructor).

    State per array: ``momentum_buffer`` (the param's shape; torch's name).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        weight_decay: λ (>= 0), decoupled: ``p ← p·(1 − γ_t λ)`` (scaled by γ_t, not by
            s·γ_t). A number, a 0-d array or a schedule.
        momentum: μ (>= 0): the EMA rate of the momentum buffer.
        nesterov: use the Nesterov mix ``g + μ (B − g)`` rather than the buffer itself.
        ns_coefficients: (a, b, c): the Newton–Schulz polynomial's coefficients (finite
            numbers).
        eps: ε (>= 0): the floor of the Frobenius norm the update is divided by.
        ns_steps: the number of Newton–Schulz iterations, an int in [0, 100).
        adjust_lr_fn: ``None`` or ``"original"`` (s = sqrt(max(1, A/B))), or
            ``"match_rms_adamw"`` (s = 0.2 sqrt(max(A, B))): the scale of the update for an
            (A, B) matrix.
        ns_dtype: ``"compute"`` (default: the compute dtype, float32 for half precision),
            ``"float32"``, or ``"bfloat16"`` (torch's iteration): the dtype the
            Newton–Schulz iteration runs in.
        impl: which implementation runs the step. This rule reduces over each array, so only
            the generic path exists: ``"auto"`` (default) and ``"generic"`` run the rule as
            written (array-API operations, one array at a time); ``"fused"`` raises
            ValueError at ``init`` / ``update`` (there is no fused step to require).

    Returns:
        Optimizer: the functional form, a pure ``init`` / ``update`` pair;
            ``polyopt.Muon(params, ...)`` is the stateful form of the same rule.

    Example: Muon for the weight matrices, AdamW for the biases. polyopt's parameter
    groups share one optimizer (one rule), so the two subsets get two optimizers, side
    by side, as in torch's own example:

    >>> import numpy as np, polyopt
    >>> rng = np.random.default_rng(0)
    >>> params = {"w1": rng.standard_normal((4, 3)), "b1": np.zeros(4),
    ...           "w2": rng.standard_normal((2, 4)), "b2": np.zeros(2)}
    >>> matrices = {k: p for k, p in params.items() if p.ndim == 2}
    >>> others = {k: p for k, p in params.items() if p.ndim != 2}
    >>> opt_muon = polyopt.muon(lr=0.02, weight_decay=0.0)
    >>> opt_adamw = polyopt.adamw(lr=3e-4, weight_decay=0.01)
    >>> s_muon, s_adamw = opt_muon.init(matrices), opt_adamw.init(others)
    >>> before = matrices["w2"].copy()
    >>> grads = {k: np.ones_like(p) for k, p in params.items()}
    >>> matrices, s_muon = opt_muon.update(
    ...     matrices, {k: grads[k] for k in matrices}, s_muon)
    >>> others, s_adamw = opt_adamw.update(others, {k: grads[k] for k in others}, s_adamw)
    >>> params = {**matrices, **others}
    >>> sorted(s_muon.slots), s_muon.slots["momentum_buffer"][0].shape
    (['momentum_buffer'], (4, 3))
    >>> step = (matrices["w2"] - before) / -0.02   # the orthogonalized update
    >>> np.round(step, 4)   # rank one: one singular value, 0.2462·sqrt(8) ≈ 0.70, not 1
    array([[0.2462, 0.2462, 0.2462, 0.2462],
           [0.2462, 0.2462, 0.2462, 0.2462]])

    (These coefficients push singular values into roughly [0.5, 1.5] rather than to 1,
    by design; see the post.)

    Post: https://kellerjordan.github.io/posts/muon/ ; Moonshot's lr scaling:
    https://arxiv.org/abs/2502.16982
    """
    return make(MUON, locals())
