"""One AdamW step on a GPU: polyopt's fused CuPy path against torch and optax.

Cases (float32):

- ``large``: one tensor of 2**28 parameters (``--large-log2``);
- ``small``: 1000 tensors (``--small-count``) of 4096 parameters (``--small-size``).

Contenders, each on the same GPU in the same run:

- ``polyopt flat``: ``polyopt.AdamW`` on CuPy arrays made with ``polyopt.flat.pack``
  and grads from ``flat.zeros_like``: one kernel launch per step;
- ``polyopt list``: ``polyopt.AdamW`` on separate CuPy arrays: one multi-tensor launch
  (for the large case the two are the same thing and only ``flat`` runs);
- ``torch fused``: ``torch.optim.AdamW(fused=True)`` on CUDA tensors;
- ``optax jit``: ``optax.adamw`` applied in a ``jax.jit`` function with donated buffers.

Every contender starts from the same values (``polyopt.bench.make_problem``, copied to
the device) and is timed by the harness ``polyopt bench`` uses (``polyopt.bench.measure``,
with a device synchronisation after each step, so host overhead and launch latency count
as they do in training): ``--warmup`` untimed steps, then the median of ``--repeat``
steps. Reported: ms per step, GB/s counted at the floor's bytes per parameter
(``polyopt.bench.FLOOR_BYTES``, 28: read p, g, m, v and write p, m, v in float32), that
as a percentage of the copy bandwidth measured on the device by bench's probe
(``polyopt.bench.bandwidth`` with CuPy), and the ratio of each time to torch fused. The
goals (docs/cupy.md): large: polyopt >= 85 % of copy bandwidth and <= 1.0x torch fused;
small: polyopt flat <= 0.5x torch fused.

    python benchmarks/gpu_adamw.py                 # everything available
    python benchmarks/gpu_adamw.py --case small --only polyopt --only torch
    python benchmarks/gpu_adamw.py --json results.json

Exits with status 2 and says why when there is no CUDA GPU (cupy is needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

from polyopt.bench import FLOOR_BYTES as BYTES_PER_PARAM
from polyopt.bench import HP, bandwidth, make_problem, measure

CONTENDERS = ("polyopt", "torch", "optax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time one AdamW step on a GPU: polyopt fused (CuPy) vs "
        "torch.optim.AdamW(fused=True) vs optax.adamw under jax.jit.",
    )
    p.add_argument(
        "--case",
        action="append",
        choices=("large", "small"),
        help="which case(s) to run (default: both)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=CONTENDERS,
        help="run only these contenders (default: every one installed)",
    )
    p.add_argument(
        "--large-log2",
        type=int,
        default=28,
        help="log2 of the parameter count of the large tensor (default 28)",
    )
    p.add_argument("--small-count", type=int, default=1000, help="number of small tensors")
    p.add_argument("--small-size", type=int, default=4096, help="parameters per small tensor")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument(
        "--repeat", type=int, default=50, help="timed steps; the median is reported (default 50)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def gpu_missing() -> str | None:
    """Why this cannot run here, or None."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install -r backends/cupy.txt)"
    except Exception as e:
        return f"cupy cannot be imported: {type(e).__name__}: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device (device count 0)"


def timed(step: Callable[[], None], sync: Callable[[], None], args) -> float:
    """Median ms of one ``step`` (synchronised), by the harness ``polyopt bench`` uses."""
    return 1e3 * statistics.median(measure(step, args.warmup, args.repeat, sync))


def problem(case: str, args):
    """The case's float32 params and grads as NumPy arrays (``polyopt.bench``'s builder)."""
    if case == "large":
        return make_problem(2**args.large_log2, 1)
    return make_problem(args.small_size * args.small_count, args.small_count)


# -- contenders ------------------------------------------------------------------------


def bench_copy(n: int, args) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) on ``n`` float32 values."""
    import cupy as cp

    return bandwidth(4 * n, kind="copy", repeats=args.repeat, xp=cp, sync=_cupy_sync())


def _cupy_sync() -> Callable[[], None]:
    import cupy as cp

    return cp.cuda.Device().synchronize


def bench_polyopt(pb, layout: str, args) -> float:
    import cupy as cp

    import polyopt
    from polyopt import flat
    from polyopt.backends import cupy as fused

    params = [cp.asarray(p) for p in pb.params]
    grads = [cp.asarray(g) for g in pb.grads]
    if layout == "flat":
        params = flat.pack(params)
        g = flat.zeros_like(params)
        for dst, src in zip(g, grads):
            dst[...] = src
        grads = g
    opt = polyopt.AdamW(params, **HP, impl="fused")
    ms = timed(lambda: opt.step(grads), _cupy_sync(), args)
    path = fused.LAST_PATH
    expected = ("span",) if layout == "flat" or pb.n_tensors == 1 else ("multi_tensor",)
    if path != expected:
        print(f"  note: polyopt {layout} took launches {path}, expected {expected}")
    return ms


def bench_torch(pb, args) -> float:
    import torch

    params = [torch.tensor(p, device="cuda").requires_grad_() for p in pb.params]
    for p, g in zip(params, pb.grads):
        p.grad = torch.tensor(g, device="cuda")
    opt = torch.optim.AdamW(params, **HP, fused=True)
    return timed(opt.step, torch.cuda.synchronize, args)


def bench_optax(pb, args) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    if not any(d.platform == "gpu" for d in jax.devices()):
        raise RuntimeError(f"JAX sees no GPU (devices: {jax.devices()}); install jax[cuda12]")
    params = [jnp.asarray(p) for p in pb.params]
    grads = [jnp.asarray(g) for g in pb.grads]
    tx = optax.adamw(HP["lr"], *HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"])

    def _update(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(_update, donate_argnums=(0, 2))
    holder = {"params": params, "state": tx.init(params)}

    def step():
        holder["params"], holder["state"] = update(holder["params"], grads, holder["state"])

    def sync():
        jax.block_until_ready(holder["params"])

    return timed(step, sync, args)


def free_memory() -> None:
    """Give cached device memory back between contenders (each allocates ~4 GiB)."""
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


# -- report ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = gpu_missing()
    if reason is not None:
        print(
            f"gpu_adamw: no GPU to benchmark on: {reason}. Nothing was measured.", file=sys.stderr
        )
        return 2
    # JAX must not take 75 % of the GPU memory up front: the others run in this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import cupy as cp

    only = set(args.only or CONTENDERS)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {device}")
    results = {"device": device, "bytes_per_param": BYTES_PER_PARAM, "cases": {}}
    for case in args.case or ["large", "small"]:
        pb = problem(case, args)
        n = pb.n_params
        copy_gbs = bench_copy(n, args)
        print(
            f"\n{case}: {pb.n_tensors} tensor(s), {n:,} float32 parameters; "
            f"device copy {copy_gbs:.0f} GB/s"
        )
        rows: dict[str, float | str] = {}
        runs: list[tuple[str, Callable[..., float], tuple]] = []
        if "polyopt" in only:
            runs.append(("polyopt flat", bench_polyopt, (pb, "flat", args)))
            if pb.n_tensors > 1:
                runs.append(("polyopt list", bench_polyopt, (pb, "list", args)))
        if "torch" in only:
            runs.append(("torch fused", bench_torch, (pb, args)))
        if "optax" in only:
            runs.append(("optax jit", bench_optax, (pb, args)))
        for name, fn, fn_args in runs:
            try:
                rows[name] = fn(*fn_args)
            except Exception as e:  # a missing library or device: say so, go on
                rows[name] = f"skipped: {type(e).__name__}: {e}"
            free_memory()
        torch_ms = rows.get("torch fused")
        print(f"  {'contender':<14} {'ms/step':>9} {'GB/s@28B':>9} {'% copy':>7} {'/ torch':>8}")
        table = {}
        for name, ms in rows.items():
            if isinstance(ms, str):
                print(f"  {name:<14} {ms}")
                table[name] = {"skipped": ms}
                continue
            gbs = BYTES_PER_PARAM * n / (ms * 1e-3) / 1e9
            ratio = ms / torch_ms if isinstance(torch_ms, float) else float("nan")
            print(f"  {name:<14} {ms:9.3f} {gbs:9.1f} {100 * gbs / copy_gbs:6.1f}% {ratio:7.2f}x")
            table[name] = {
                "ms": ms,
                "gbs": gbs,
                "pct_copy": 100 * gbs / copy_gbs,
                "vs_torch": ratio,
            }
        results["cases"][case] = {
            "params": n,
            "tensors": pb.n_tensors,
            "copy_gbs": copy_gbs,
            "results": table,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
