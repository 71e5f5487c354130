"""One optimizer step, parametrized by backend × optimizer × impl × layout × size.

The pattern is scipy's ``benchmarks/common.py::XPBenchmark``: the backend is a
parameter, ``setup`` imports it (and raises ``NotImplementedError``, asv's way to skip,
when it is missing, has no device, or has no fused path for the optimizer), and every
timed call synchronizes the device so that asynchronous libraries are timed to the end
of their work: ``torch.cuda.synchronize()``, CuPy's stream ``synchronize()``, JAX's
``block_until_ready``.

Params are float32, split into ``tensors`` equal 1-D arrays holding ``size`` parameters
in all, with the same values on every backend: the problems of ``python -m polyopt
bench`` (``polyopt.bench.make_problem``), every optimizer at the bench's
hyperparameters (``polyopt.bench.TORCH_HP``: torch's defaults, SGD with momentum
0.9). NumPy, torch and CuPy run the stateful form (in place); JAX runs
``jax.jit(opt.update, donate_argnums=(0, 2))``.

Benchmarks:

- ``time_step``: one step;
- ``peakmem_step``: peak resident memory of the process around one step (asv measures
  the whole process, so it includes the libraries: compare across commits, not across
  backends);
- ``track_bandwidth_gbs``: effective bandwidth of the median of 5 steps, counting the
  least memory traffic of the update (``polyopt.bench.traffic_bytes``: float32,
  28 bytes/param for Adam/AdamW, 20 for SGD with momentum). See ``python -m polyopt
  bench`` for the same against the machine's copy bandwidth and against torch.optim /
  optax.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import time

import numpy as np

import polyopt
from polyopt import bench

BACKENDS = ["numpy", "torch", "jax", "cupy"]
#: functional name -> class name (bench.TORCH_HP is keyed by class name)
CLASSES = {name: cls.__name__ for name, (_, cls) in polyopt.OPTIMIZERS.items()}
OPTIMIZERS = sorted(CLASSES)
IMPLS = ["generic", "fused"]
LAYOUTS = [1, 100, 1000]  # number of tensors
SIZES = [100_000, 1_000_000]  # parameters in all


def _preload() -> None:
    """Import the CPU libraries once, in asv's forkserver (``launch_method`` in
    asv.conf.json), so that each benchmark process, forked from it, starts with them
    (a fresh import of torch and jax per parameter combination would take most of a
    ``--quick`` run). Nothing is initialized: no device, no thread pool, before the
    fork. CuPy is left to ``setup``: its import may touch the CUDA driver."""
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name) is not None:
            try:
                importlib.import_module(name)
            except Exception:  # a broken install: setup reports it
                pass
    try:
        from polyopt import backends

        backends.available("adam", "numpy")  # loads the numba kernels from their cache
    except Exception:
        pass


_preload()


def _skip(reason: str):
    return NotImplementedError(reason)


class XPBenchmark:
    """Backend as the first parameter; ``setup`` gives ``self.xp`` and ``self.synchronize``."""

    def setup(self, backend, *args):
        if importlib.util.find_spec(backend) is None:
            raise _skip(f"{backend} is not installed")
        self.synchronize = lambda: None
        if backend == "numpy":
            self.convert = np.asarray
        elif backend == "torch":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cuda":
                self.synchronize = torch.cuda.synchronize
            self.convert = lambda a: torch.from_numpy(a).to(device)
        elif backend == "cupy":
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() < 1:
                    raise _skip("no CUDA device")
            except Exception as e:  # CUDA missing, driver too old...
                raise _skip(f"cupy unusable: {e}") from None
            self.synchronize = lambda: cupy.cuda.get_current_stream().synchronize()
            self.convert = cupy.asarray
        elif backend == "jax":
            import jax
            import jax.numpy as jnp

            self.convert = jnp.asarray
            self.synchronize = None  # JAX: block on the results, in the step itself
            self.jax = jax
        else:
            raise _skip(f"unknown backend {backend}")


class Step(XPBenchmark):
    params = [BACKENDS, OPTIMIZERS, IMPLS, LAYOUTS, SIZES]
    param_names = ["backend", "optimizer", "impl", "tensors", "size"]
    timeout = 300

    def setup(self, backend, optimizer, impl, tensors, size):
        super().setup(backend)
        from polyopt import backends

        factory = getattr(polyopt, optimizer)
        rule = factory().rule
        if impl == "fused" and not backends.available(rule, backend):
            raise _skip(f"no fused {rule.name} path for {backend}")
        pb = bench.make_problem(size, tensors)
        params = [self.convert(a) for a in pb.params]
        grads = [self.convert(a) for a in pb.grads]
        hp = bench.TORCH_HP[CLASSES[optimizer]]
        if backend == "jax":
            jax = self.jax
            opt = factory(**hp, impl=impl)
            update = jax.jit(opt.update, donate_argnums=(0, 2))
            box = [params, opt.init(params)]

            def step():
                box[0], box[1] = update(box[0], grads, box[1])
                jax.block_until_ready(box[0])

        else:
            cls = polyopt.OPTIMIZERS[optimizer][1]
            sopt = cls(params, **hp, impl=impl)
            sync = self.synchronize

            def step():
                sopt.step(grads)
                sync()

        self.step = step
        self.nbytes = bench.traffic_bytes(CLASSES[optimizer]) * size
        step()  # warm-up: compilation (jit, numba), lazy state, first-touch page faults
        step()

    def time_step(self, *args):
        self.step()

    def peakmem_step(self, *args):
        self.step()

    def track_bandwidth_gbs(self, *args):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return self.nbytes / statistics.median(times) / 1e9

    track_bandwidth_gbs.unit = "GB/s"
