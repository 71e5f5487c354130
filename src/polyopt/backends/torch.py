"""PyTorch fast path for Adam / AdamW: torch's own fused multi-tensor kernels.

The generic path runs about a dozen eager torch operations per tensor, each a Python
call, a dispatch and (on a GPU) a kernel launch; for a model with hundreds of tensors
that overhead, not the arithmetic, sets the step time. ``torch._fused_adam_`` and
``torch._fused_adamw_`` (the kernels behind ``torch.optim.Adam(fused=True)``) update a
whole list of tensors in one call and one pass over memory, in place. This module calls
them on the user's own tensors, grouped by (device, dtype) as the CUDA kernel needs.

Same math, not a second definition of it: the kernels compute polyopt's ``adam`` rule
(``polyopt.rules.adam``), which is ``torch.optim.Adam``/``AdamW`` exactly. How they are
called, and the two places their rounding differs from the generic path:

- polyopt's ``k`` is the 0-based count before this update. ``torch.optim`` increments
  its ``state_steps`` tensors first and then calls the kernel, which reads them as the
  1-based ``t`` of the bias corrections (computed in float64 from a float32 step). So
  the kernel gets one float32 tensor holding ``t = k + 1`` per (device, dtype) group
  (the same tensor repeated in the list: the kernel only reads it). Exact up to
  ``t = 2**24``, far past the point where both bias corrections are 1 in float64.
- ``decoupled_weight_decay`` selects ``_fused_adamw_`` over ``_fused_adam_`` (coupled:
  ``g + λp``). The AdamW kernel multiplies by ``1 − lr·λ`` rounded to the compute
  dtype, as every ``torch.optim.AdamW`` does; the generic rule computes
  ``p − (lr·λ)·p``, rounding only the result. Each step, the two agree to float
  rounding, but the factor's rounding error δ (up to 3e-8 in float32) is the same
  every step, so it changes the decay itself by δ/(lr·λ): 0.14 % at torch's defaults
  lr = 1e-3, λ = 1e-2 (measured: after 30 steps of pure decay, params differ from the
  generic path's by 1.6e-6 relative in float32, 2.4e-15 in float64), 1.3 % at
  lr·λ = 1e-6, and no decay at all once lr·λ < 3e-8 (the tail of a schedule). Where
  that error would exceed :data:`DECAY_RTOL` (1 %), this module applies the decay as
  the generic rule does, in a separate ``torch._foreach_add_(p, p, alpha=-lr·λ)`` pass
  (8 more bytes of traffic per float32 parameter), and runs the kernel with λ = 0.
  Half-precision params keep the kernel's decay: storing them rounds far more.
- The first moment is updated as ``lerp(m, g, 1 − β1)`` inside the kernel, which equals
  ``β1·m + (1 − β1)·g`` up to one rounding.

Where the kernels cannot be used, the group (or the tensor) takes the generic rule, so
``impl="fused"`` always gives the generic path's numbers within the dtype's tolerance:

- hyperparameters that are not Python numbers (the kernels take host scalars; a
  0-d CPU tensor that needs no gradient is read as a number by the engine first);
- a device type without fused kernels (torch's own list), or a dtype other than
  float16 / bfloat16 / float32 / float64;
- a parameter or state tensor that is not contiguous: torch's CPU kernel walks
  ``data_ptr()`` linearly over ``numel()`` elements and ignores strides, so on a strided
  view it reads and writes the wrong memory (``torch.optim.AdamW(fused=True)`` on a
  non-contiguous leaf writes outside the view in torch 2.13). Non-contiguous grads are
  copied to contiguous ones (they are only read).

The pure form (``inplace=False``) clones the params and state first and runs the kernel
on the clones: the kernels exist only in the in-place form, and the pure form must not
mutate its inputs. The clones are contiguous, so every tensor takes the kernel there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._base import Optimizer
from ..rules.adam import ADAM
from . import FastPath, register

_FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
#: largest relative error of the decoupled decay left to the kernel's rounded factor
DECAY_RTOL = 1e-2


def _fused_devices() -> frozenset:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return frozenset({"cpu", "cuda"})


_FUSED_DEVICES = _fused_devices()
HAVE_FUSED = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")

#: The generic rule, for what the kernels cannot take (same code as impl="generic").
_GENERIC = Optimizer(ADAM, {}, impl="generic")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _host_scalars(hp: dict, k: Any) -> bool:
    b1, b2 = hp["betas"]
    return isinstance(k, int) and all(
        _number(x) for x in (hp["lr"], hp["weight_decay"], hp["eps"], b1, b2)
    )


def _kernel_decay_error(decay: float, dtype: torch.dtype) -> float:
    """Relative error of the decay ``decay = lr·λ`` when the kernel multiplies by
    ``1 − decay`` rounded to its compute dtype (float64 for float64 params, else float32)."""
    factor = float((np.float64 if dtype == torch.float64 else np.float32)(1.0 - decay))
    return abs((1.0 - factor) - decay) / decay


def _generic(xp, p, g, slots, i, hp, k):
    """The engine's per-array step for array ``i`` of the group."""
    return _GENERIC._step_one(xp, p, g, {n: a[i] for n, a in slots.items()}, hp, k)


def _fusable(device: torch.device, dtype: torch.dtype) -> bool:
    return HAVE_FUSED and dtype in _FUSED_DTYPES and device.type in _FUSED_DEVICES


_NEW = object()


def _plan(xp, params, grads, slots, hp, k, inplace):
    """One Adam/AdamW update of a run of arrays (see the module docstring): the lists
    for the kernels and the generic math for the tensors they cannot take are made now;
    the returned commit runs the kernels (in place) and returns ``(params, slots)``."""
    if not HAVE_FUSED or not _host_scalars(hp, k):
        result = _GENERIC._step_group(xp, params, grads, slots, hp, k)
        return lambda: result

    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
    out_p: list = [None] * len(params)
    out_s: dict = {name: [None] * len(params) for name in names}
    # (device, dtype) -> [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], or None
    # where the kernels do not apply. This loop is the Python cost per tensor (~1 µs):
    # keep it lean.
    groups: dict = {}
    columns = [slots[n] for n in names]
    for i, (p, g) in enumerate(zip(params, grads)):
        key = (p.device, p.dtype)
        lists = groups.get(key, _NEW)
        if lists is _NEW:
            lists = groups[key] = [[], [], [], [], []] if _fusable(*key) else None
        st = [c[i] for c in columns]
        if lists is None or (
            inplace and not (p.is_contiguous() and all(t.is_contiguous() for t in st))
        ):
            out_p[i], s = _generic(xp, p, g, slots, i, hp, k)
            for name in names:
                out_s[name][i] = s[name]
            continue
        if not inplace:  # the kernel works in place only: give it (contiguous) copies
            p = p.clone(memory_format=torch.contiguous_format)
            st = [t.clone(memory_format=torch.contiguous_format) for t in st]
        for name, t in zip(names, st):  # in place: the same tensors, updated
            out_s[name][i] = t
        if not g.is_contiguous():
            g = g.contiguous()  # only read
        out_p[i] = p
        lists[0].append(p)
        lists[1].append(g)
        for j, t in enumerate(st):
            lists[2 + j].append(t)

    b1, b2 = hp["betas"]
    lr, wd = float(hp["lr"]), float(hp["weight_decay"])
    decoupled = bool(hp["decoupled_weight_decay"])
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    launches = []
    steps: dict = {}
    for (dev, dt), lists in groups.items():
        if not lists or not lists[0]:
            continue
        t = steps.get(dev)
        if t is None:  # the 1-based step the kernel reads (torch.optim increments first)
            t = steps[dev] = torch.full((), float(k + 1), dtype=torch.float32, device=dev)
        separate_decay = (
            decoupled
            and lr * wd > 0
            and dt in (torch.float32, torch.float64)
            and _kernel_decay_error(lr * wd, dt) > DECAY_RTOL
        )
        launches.append((lists, t, separate_decay))

    def commit():
        for (ps, gs, ms, vs, maxs), t, separate_decay in launches:
            if separate_decay:
                torch._foreach_add_(ps, ps, alpha=-(lr * wd))  # p − (lr·λ)·p, as the rule does
            kernel(
                ps,
                gs,
                ms,
                vs,
                maxs,
                [t] * len(ps),
                lr=lr,
                beta1=float(b1),
                beta2=float(b2),
                weight_decay=0.0 if separate_decay else wd,
                eps=float(hp["eps"]),
                amsgrad=bool(hp["amsgrad"]),
                maximize=bool(hp["maximize"]),
            )
        return out_p, out_s

    if inplace:
        return commit
    result = commit()  # on the clones
    return lambda: result


def pure(xp, params, grads, slots, hp, k):
    return _plan(xp, params, grads, slots, hp, k, False)()


def inplace(xp, params, grads, slots, hp, k):
    return _plan(xp, params, grads, slots, hp, k, True)


FUSED_ADAM = FastPath(pure, inplace)
register(("adam", "adamw"), "torch", FUSED_ADAM)
