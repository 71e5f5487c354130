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

Each contender runs ``--warmup`` steps, then ``--repeat`` steps timed together with the
wall clock and a device synchronisation at the end, so host overhead counts as it does in
training. Reported: ms per step, GB/s counted at 28 bytes per parameter (the floor: read
p, g, m, v and write p, m, v in float32), that as a percentage of the copy bandwidth
measured here (a device-to-device copy, bytes read + written), and the ratio of each
time to torch fused. The goals (docs/cupy.md): large: polyopt >= 85 % of copy
bandwidth and <= 1.0x torch fused; small: polyopt flat <= 0.5x torch fused.

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
import time
from collections.abc import Callable

BYTES_PER_PARAM = 28  # float32 AdamW: read p, g, m, v; write p, m, v
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
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
    p.add_argument("--repeat", type=int, default=50, help="timed steps (default 50)")
    p.add_argument(
        "--trials",
        type=int,
        default=3,
        help="timed runs of --repeat steps; the median is reported (default 3)",
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
    """Median over trials of (wall time of ``repeat`` steps + sync) / repeat, in ms."""
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.trials):
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            step()
        sync()
        times.append((time.perf_counter() - t0) / args.repeat * 1e3)
    return statistics.median(times)


def sizes_of(case: str, args) -> list[int]:
    if case == "large":
        return [2**args.large_log2]
    return [args.small_size] * args.small_count


# -- contenders ------------------------------------------------------------------------


def bench_copy(n: int, args) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) on ``n`` float32 values."""
    import cupy as cp

    a = cp.ones(n, dtype=cp.float32)
    b = cp.empty_like(a)
    ms = timed(lambda: cp.copyto(b, a), cp.cuda.Device().synchronize, args)
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def bench_polyopt(sizes: list[int], layout: str, args) -> float:
    import cupy as cp

    import polyopt
    from polyopt import flat
    from polyopt.backends import cupy as fused

    rng = cp.random.default_rng(0)
    params = [rng.standard_normal(n, dtype=cp.float32) for n in sizes]
    grads = [rng.standard_normal(n, dtype=cp.float32) for n in sizes]
    if layout == "flat":
        params = flat.pack(params)
        g = flat.zeros_like(params)
        for dst, src in zip(g, grads):
            dst[...] = src
        grads = g
    opt = polyopt.AdamW(params, **HP, impl="fused")
    ms = timed(lambda: opt.step(grads), cp.cuda.Device().synchronize, args)
    path = fused.LAST_PATH
    expected = ("span",) if layout == "flat" or len(sizes) == 1 else ("multi_tensor",)
    if path != expected:
        print(f"  note: polyopt {layout} took launches {path}, expected {expected}")
    return ms


def bench_torch(sizes: list[int], args) -> float:
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(n, device="cuda", generator=gen).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    opt = torch.optim.AdamW(params, **HP, fused=True)
    return timed(opt.step, torch.cuda.synchronize, args)


def bench_optax(sizes: list[int], args) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    if not any(d.platform == "gpu" for d in jax.devices()):
        raise RuntimeError(f"JAX sees no GPU (devices: {jax.devices()}); install jax[cuda12]")
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(sizes))
    params = [jax.random.normal(k, (n,), jnp.float32) for k, n in zip(keys[::2], sizes)]
    grads = [jax.random.normal(k, (n,), jnp.float32) for k, n in zip(keys[1::2], sizes)]
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
        sizes = sizes_of(case, args)
        n = sum(sizes)
        copy_gbs = bench_copy(n, args)
        print(
            f"\n{case}: {len(sizes)} tensor(s), {n:,} float32 parameters; "
            f"device copy {copy_gbs:.0f} GB/s"
        )
        rows: dict[str, float | str] = {}
        runs: list[tuple[str, Callable[..., float], tuple]] = []
        if "polyopt" in only:
            runs.append(("polyopt flat", bench_polyopt, (sizes, "flat", args)))
            if len(sizes) > 1:
                runs.append(("polyopt list", bench_polyopt, (sizes, "list", args)))
        if "torch" in only:
            runs.append(("torch fused", bench_torch, (sizes, args)))
        if "optax" in only:
            runs.append(("optax jit", bench_optax, (sizes, args)))
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
            "tensors": len(sizes),
            "copy_gbs": copy_gbs,
            "results": table,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
