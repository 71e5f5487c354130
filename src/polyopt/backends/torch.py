"""PyTorch fast paths: torch's own fused multi-tensor kernels for Adam / AdamW, SGD and
Adagrad, and for every other elementwise rule the kernel derived from the rule (CPU,
:mod:`polyopt.backends._derive`).

The generic path runs about a dozen eager torch operations per tensor, each a Python
call, a dispatch and (on a GPU) a kernel launch; for a model with hundreds of tensors
that overhead, not the arithmetic, sets the step time. ``torch._fused_adam_`` and
``torch._fused_adamw_`` (the kernels behind ``torch.optim.Adam(fused=True)``) update a
whole list of tensors in one call and one pass over memory, in place. This module calls
them on the user's own tensors, grouped by (device, dtype) as the CUDA kernel needs.

Same math, not a second definition of it: the kernels compute polyopt's rules
(``polyopt.rules.adam``, ``.sgd``, ``.adagrad``), which are ``torch.optim``'s exactly; the
conformance matrix and ``tests/test_torch_fused.py`` hold each kernel to its rule.
``_fused_sgd_`` is told ``is_first_step`` (the momentum buffer is the gradient itself on
an array's first update, as the rule's ``after_first`` says) and ``_fused_adagrad_``
reads the 1-based step like the Adam kernels. How the Adam kernels are called, and the
two places their rounding differs from the generic path:

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

from collections.abc import Callable

import numpy as np
import torch

from ..rules.adagrad import ADAGRAD
from ..rules.adam import ADAM
from ..rules.sgd import SGD_RULE
from . import AmpUnsupported, FastPath, _derive, generic, register

_FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: whether CPU float32/float64 tensors take the kernel derived from the rule (numba)
#: even where torch has a fused kernel. Off: measured in one run on 2 cores, the two
#: are within 2 % for Adam, AdamW and Adagrad; for SGD the derived one is 5 % slower at
#: 10M params in 100 tensors and 27 % faster at 1M in 1000. torch's kernels also serve
#: CUDA, so they stay the default and stay under test.
DERIVED_ON_CPU = False
#: largest relative error of the decoupled decay left to the kernel's rounded factor
DECAY_RTOL = 1e-2


def _fused_devices() -> frozenset:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        return frozenset({"cpu", "cuda"})


_FUSED_DEVICES = _fused_devices()


def _kernel_decay_error(decay: float, dtype: torch.dtype) -> float:
    """Relative error of the decay ``decay = lr·λ`` when the kernel multiplies by
    ``1 − decay`` rounded to its compute dtype (float64 for float64 params, else float32)."""
    factor = float((np.float64 if dtype == torch.float64 else np.float32)(1.0 - decay))
    return abs((1.0 - factor) - decay) / decay


def _fusable(kernel, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one launch takes tensors of this device and dtype: torch's kernel, or
    the kernel derived from the rule (CPU, float32 / float64, with numba)."""
    if _derived_takes(device, dtype) and (kernel.launch is None or DERIVED_ON_CPU):
        return True
    return kernel.launch is not None and dtype in _FUSED_DTYPES and device.type in _FUSED_DEVICES


def _derived_takes(device: torch.device, dtype: torch.dtype) -> bool:
    return _derive.HAVE_NUMBA and device.type == "cpu" and dtype in _NP_DTYPES


class _Kernel:
    """How one of torch's fused kernels computes one rule.

    - ``takes(hp)``: whether the kernel computes the rule for these hyperparameters.
    - ``launch(lists, t, k, hp, dtype)``: run it on ``[params, grads, *slots]`` of one
      (device, dtype), in place; ``t`` is a float32 tensor holding ``k + 1``.
    """

    def __init__(self, rule, names, takes, launch, reads_t=True):
        self.reads_t = reads_t  # the kernel reads the step count from a tensor
        self.rule, self.names, self.takes, self.launch = rule, names, takes, launch
        self.generic = generic(rule)  # what the kernel cannot take


def _adam_names(hp):
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())


def _launch_adam(lists, t, k, hp, dtype, amp=(None, None)):
    ps, gs, ms, vs, *rest = lists
    maxs = rest[0] if rest else []
    b1, b2 = hp["betas"]
    lr, wd = float(hp["lr"]), float(hp["weight_decay"])
    decoupled = bool(hp["decoupled_weight_decay"])
    separate_decay = (  # not with GradScaler: a skipped step must not decay either
        decoupled
        and amp == (None, None)
        and lr * wd > 0
        and dtype in (torch.float32, torch.float64)
        and _kernel_decay_error(lr * wd, dtype) > DECAY_RTOL
    )
    if separate_decay:
        torch._foreach_add_(ps, ps, alpha=-(lr * wd))  # p − (lr·λ)·p, as the rule does
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
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
        grad_scale=amp[0],
        found_inf=amp[1],
    )


def _sgd_names(hp):
    return SGD_RULE.slots(hp)


def _launch_sgd(lists, t, k, hp, dtype, amp=(None, None)):
    ps, gs, *bufs = lists
    torch._fused_sgd_(
        ps,
        gs,
        bufs[0] if bufs else [],
        weight_decay=float(hp["weight_decay"]),
        momentum=float(hp["momentum"]),
        lr=float(hp["lr"]),
        dampening=float(hp["dampening"]),
        nesterov=bool(hp["nesterov"]),
        maximize=bool(hp["maximize"]),
        is_first_step=k == 0,
        grad_scale=amp[0],
        found_inf=amp[1],
    )


def _launch_adagrad(lists, t, k, hp, dtype, amp=(None, None)):
    ps, gs, sums = lists
    torch._fused_adagrad_(
        ps,
        gs,
        sums,
        [t] * len(ps),
        lr=float(hp["lr"]),
        lr_decay=float(hp["lr_decay"]),
        weight_decay=float(hp["weight_decay"]),
        eps=float(hp["eps"]),
        maximize=bool(hp["maximize"]),
        grad_scale=amp[0],
        found_inf=amp[1],
    )


def _sgd_takes(hp):  # the kernel's decay is coupled only
    return not hp["decoupled_weight_decay"] or hp["weight_decay"] == 0


_ADAM = _Kernel(ADAM, _adam_names, lambda hp: True, _launch_adam)
_SGD = _Kernel(SGD_RULE, _sgd_names, _sgd_takes, _launch_sgd, reads_t=False)  # is_first_step
_ADAGRAD = _Kernel(ADAGRAD, lambda hp: ("sum",), lambda hp: True, _launch_adagrad)


_NEW = object()


def _plan(kernel: _Kernel, xp, params, grads, slots, hp, k, inplace, amp=None):
    """One update of a run of arrays with ``kernel`` (see the module docstring): the
    lists for the kernel and the generic math for the tensors it cannot take are made
    now; the returned commit runs the kernel (in place) and returns ``(params, slots)``."""
    generic = kernel.generic
    if not _derive.host_values(hp, k) or not kernel.takes(hp):
        if amp is not None:
            raise AmpUnsupported("hyperparameters the kernel does not take")
        result = generic._step_group(xp, params, grads, slots, hp, k)
        return lambda: result

    names = kernel.names(hp)
    whole = _whole(kernel, params, grads, [slots[n] for n in names]) if inplace else None
    if amp is not None:  # every tensor in torch's kernel, which unscales and skips itself
        if whole is None or kernel.launch is None or _uses_derived(kernel, params[0]):
            raise AmpUnsupported("tensors torch's kernel does not take")
        launch = _launch_for(kernel, whole, params[0].device, params[0].dtype, k, hp, amp)
        out = list(params), {n: list(slots[n]) for n in names}
        return lambda: _launch_all([launch], out)
    if whole is not None:  # one dtype, all contiguous: the lists as they are
        launches = [_launch_for(kernel, whole, params[0].device, params[0].dtype, k, hp)]
        out = list(params), {n: list(slots[n]) for n in names}
        return lambda: _launch_all(launches, out)

    out_p: list = [None] * len(params)
    out_s: dict = {name: [None] * len(params) for name in names}
    # (device, dtype) -> [params, grads, *slots], or None where the kernel does not
    # apply. This loop is the Python cost per tensor (~1 µs): keep it lean.
    groups: dict = {}
    width = 2 + len(names)
    for i, (p, g, *st) in enumerate(zip(params, grads, *[slots[n] for n in names])):
        key = (p.device, p.dtype)
        lists = groups.get(key, _NEW)
        if lists is _NEW:
            lists = groups[key] = [[] for _ in range(width)] if _fusable(kernel, *key) else None
        strided = inplace and not p.is_contiguous()
        if inplace and not strided:
            for t in st:
                if not t.is_contiguous():
                    strided = True
                    break
        if lists is None or strided:
            out_p[i], s = generic._step_one(xp, p, g, dict(zip(names, st)), hp, k)
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

    launches = [
        _launch_for(kernel, lists, dev, dt, k, hp)
        for (dev, dt), lists in groups.items()
        if lists and lists[0]
    ]
    if inplace:
        return lambda: _launch_all(launches, (out_p, out_s))
    result = _launch_all(launches, (out_p, out_s))  # on the clones
    return lambda: result


def _whole(kernel, params, grads, columns) -> list | None:
    """``[params, grads, *slots]`` as they are if one launch can take every tensor in
    place (one dtype, all contiguous; the engine has checked that the params share one
    device), else None. A few passes at C speed instead of a Python loop per tensor:
    the common case of a model's step."""
    if len({p.dtype for p in params}) != 1:
        return None
    if not _fusable(kernel, params[0].device, params[0].dtype):
        return None
    contiguous = torch.Tensor.is_contiguous
    if not (all(map(contiguous, params)) and all(map(contiguous, grads))):
        return None
    if not all(all(map(contiguous, c)) for c in columns):
        return None
    return [list(params), list(grads), *[list(c) for c in columns]]


def _uses_derived(kernel, p) -> bool:
    return _derived_takes(p.device, p.dtype) and (kernel.launch is None or DERIVED_ON_CPU)


def _launch_for(kernel, lists, device, dtype, k, hp, amp=None) -> Callable[[], None]:
    """One launch over ``lists`` (``[params, grads, *slots]`` of one device and dtype),
    made ready now (compiled, its tables built) and run by the commit: the kernel
    derived from the rule on CPU (see ``DERIVED_ON_CPU``), else torch's."""
    if _derived_takes(device, dtype) and (kernel.launch is None or DERIVED_ON_CPU):
        np_dtype = _NP_DTYPES[dtype]
        derived, _, sc = _derive.numba_kernel(kernel.rule, hp, k + 1, np_dtype)
        ptr = torch.Tensor.data_ptr
        tab = np.array([list(map(ptr, col)) for col in lists], dtype=np.int64)
        sizes = np.fromiter(map(torch.Tensor.numel, lists[0]), dtype=np.int64, count=tab.shape[1])
        derived.ready(sizes)
        params = lists[0]

        def run():
            derived(tab, sizes, sc)
            # written through raw addresses: tell autograd the params changed, as an
            # in-place torch op would (a graph that saved them then refuses to run)
            torch.autograd.graph.increment_version(params)

        return run
    # the 1-based step the kernel reads (torch.optim increments its counters first)
    t = _step_tensor(k, device) if kernel.reads_t else None
    if amp is None:
        return lambda: kernel.launch(lists, t, k, hp, dtype)
    on_device = tuple(None if x is None else x.to(device, non_blocking=True) for x in amp)
    return lambda: kernel.launch(lists, t, k, hp, dtype, on_device)


def _step_tensor(k, device) -> torch.Tensor:
    return torch.full((), float(k + 1), dtype=torch.float32, device=device)


def _launch_all(launches, out):
    for launch in launches:
        launch()
    return out


def _fast_path(kernel: _Kernel | None) -> FastPath:
    """torch's kernel for one rule, or (``None``) the kernel derived from whichever rule
    the engine passes (CPU)."""

    def spec(rule):
        return kernel if kernel is not None else _derived_spec(rule)

    def pure(rule, xp, params, grads, slots, hp, k):
        return _plan(spec(rule), xp, params, grads, slots, hp, k, False)()

    def inplace(rule, xp, params, grads, slots, hp, k, amp=None):
        return _plan(spec(rule), xp, params, grads, slots, hp, k, True, amp)

    return FastPath(pure, inplace, amp=kernel is not None and kernel.launch is not None)


_DERIVED: dict = {}


def _derived_spec(rule) -> _Kernel:
    """No torch kernel: the one derived from the rule (CPU float32/float64 with numba;
    other tensors take the generic rule)."""
    spec = _DERIVED.get(rule.name)
    if spec is None or spec.rule is not rule:
        spec = _DERIVED[rule.name] = _Kernel(rule, rule.slots, lambda hp: True, None)
    return spec


FUSED_ADAM = _fast_path(_ADAM)
if hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_"):
    register(("adam", "adamw"), "torch", FUSED_ADAM)
if hasattr(torch, "_fused_sgd_"):
    register(("sgd",), "torch", _fast_path(_SGD))
if hasattr(torch, "_fused_adagrad_"):
    register(("adagrad",), "torch", _fast_path(_ADAGRAD))
if _derive.HAVE_NUMBA:  # every other elementwise rule: its derived kernel, on CPU
    register(None, "torch", _fast_path(None))
