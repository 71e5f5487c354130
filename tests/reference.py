"""An independent NumPy float64 reference for every polyopt optimizer and schedule.

Written from the published algorithms -- the algorithm boxes of the ``torch.optim``
documentation (https://pytorch.org/docs/stable/optim.html) and the papers -- and NOT
from polyopt: nothing here imports polyopt. It is deliberately plain and written the
way the pseudo-code reads (bias-corrected ``m_hat`` / ``v_hat``, an explicit first-step
branch for the SGD momentum buffer, state created lazily on the first step as torch
does), so that agreement with polyopt is evidence, not a copy of the same code.

One deliberate reading of the docs: torch's boxes write ``maximize`` for SGD as
``θ_t = θ_{t-1} + γ g_t`` *after* weight decay is added, but torch's code negates the
gradient first (``maximize`` means "minimise -f", and decay still shrinks the weights).
The reference follows the code (test_torch.py checks this against torch itself).

Entry point::

    history = reference_run(name, hyperparams, p0, grads_sequence)
    params_k, states_k = history[k]          # after step k + 1

``states_k[i]`` is a dict of the slots of array ``i`` named as torch names them
(``exp_avg``, ``momentum_buffer``, ...). ``lr`` / ``weight_decay`` may be callables of
the 0-based step index ``k``; :func:`make_schedule` builds them with Python ``math``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np

#: torch.optim's defaults (from its documentation); polyopt promises the same.
#: ``decoupled_weight_decay`` is polyopt's switch for SGDW / AdamW-style decay.
DEFAULTS = {
    "sgd": dict(
        lr=1e-3,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        decoupled_weight_decay=False,
    ),
    "adagrad": dict(
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        maximize=False,
    ),
    "rmsprop": dict(
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        maximize=False,
    ),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "adam": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    ),
    "adamw": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=True,
    ),
    "nadam": dict(
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
        maximize=False,
    ),
    "radam": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        maximize=False,
    ),
    "adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    # optax.lion's defaults (torch has no Lion), with the paper's lr
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-3, maximize=False),
    "adafactor": dict(
        lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False
    ),
    # optax.lamb's defaults (optax has no default lr: 1e-3)
    "lamb": dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, eps_root=0.0, weight_decay=0.0, maximize=False
    ),
    # Keskar & Socher (2017), Algorithm 1: eps = 1e-9 (Adam's and the criterion's)
    "swats": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-9, weight_decay=0.0, maximize=False),
    # optax.contrib.schedule_free_adamw's defaults
    "schedule_free_adamw": dict(
        lr=0.0025,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        weight_lr_power=2.0,
    ),
}


# --------------------------------------------------------------------------------------
# Optimizers: one function per optimizer, one step of one array.
# Signature: (theta, grad, state, t, lr, weight_decay, hp) -> theta_new; ``state`` is
# updated in place (it is the reference's own dict), ``t`` is 1-based as in the papers.
# --------------------------------------------------------------------------------------


def sgd(theta, grad, state, t, lr, wd, hp):
    """torch.optim.SGD's box, plus SGDW (Loshchilov & Hutter, Alg. 1, decay scaled by lr)."""
    mu, tau = hp["momentum"], hp["dampening"]
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        if hp["decoupled_weight_decay"]:
            theta = theta * (1.0 - lr * wd)  # SGDW: decay the weight, not the gradient
        else:
            g = g + wd * theta  # L2: the decay enters the gradient (and the buffer)
    if mu != 0:
        if t > 1:
            b = mu * state["momentum_buffer"] + (1.0 - tau) * g
        else:
            b = g.copy()  # b_1 = g_1: no dampening on the first step
        state["momentum_buffer"] = b
        if hp["nesterov"]:
            g = g + mu * b
        else:
            g = b
    return theta - lr * g


def adagrad(theta, grad, state, t, lr, wd, hp):
    """torch.optim.Adagrad's box (Duchi et al. 2011 with lr decay)."""
    if t == 1:
        state["sum"] = np.full_like(theta, hp["initial_accumulator_value"])
    g = -grad if hp["maximize"] else grad
    lr_t = lr / (1.0 + (t - 1) * hp["lr_decay"])
    if wd != 0:
        g = g + wd * theta
    state["sum"] = state["sum"] + g**2
    return theta - lr_t * g / (np.sqrt(state["sum"]) + hp["eps"])


def rmsprop(theta, grad, state, t, lr, wd, hp):
    """torch.optim.RMSprop's box (Hinton's lecture 6e; centered variant from Graves 2013)."""
    alpha, mu, eps = hp["alpha"], hp["momentum"], hp["eps"]
    if t == 1:
        state["square_avg"] = np.zeros_like(theta)
        if mu > 0:
            state["momentum_buffer"] = np.zeros_like(theta)
        if hp["centered"]:
            state["grad_avg"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        g = g + wd * theta
    v = alpha * state["square_avg"] + (1.0 - alpha) * g**2
    state["square_avg"] = v
    v_tilde = v
    if hp["centered"]:
        g_ave = alpha * state["grad_avg"] + (1.0 - alpha) * g
        state["grad_avg"] = g_ave
        v_tilde = v - g_ave**2
    if mu > 0:
        b = mu * state["momentum_buffer"] + g / (np.sqrt(v_tilde) + eps)
        state["momentum_buffer"] = b
        return theta - lr * b
    return theta - lr * g / (np.sqrt(v_tilde) + eps)


def adadelta(theta, grad, state, t, lr, wd, hp):
    """torch.optim.Adadelta's box (Zeiler 2012, with a learning rate)."""
    rho, eps = hp["rho"], hp["eps"]
    if t == 1:
        state["square_avg"] = np.zeros_like(theta)
        state["acc_delta"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        g = g + wd * theta
    v = state["square_avg"] * rho + g**2 * (1.0 - rho)
    dx = np.sqrt(state["acc_delta"] + eps) / np.sqrt(v + eps) * g
    u = state["acc_delta"] * rho + dx**2 * (1.0 - rho)
    state["square_avg"], state["acc_delta"] = v, u
    return theta - lr * dx


def adam(theta, grad, state, t, lr, wd, hp):
    """torch.optim.Adam's box (Kingma & Ba 2015; AMSGrad, Reddi et al. 2018), and
    torch.optim.AdamW's box when ``decoupled_weight_decay`` (Loshchilov & Hutter 2019)."""
    beta1, beta2 = hp["betas"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
        state["exp_avg_sq"] = np.zeros_like(theta)
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        if hp["decoupled_weight_decay"]:
            theta = theta - lr * wd * theta  # AdamW box: θ_t ← θ_{t-1} - γλθ_{t-1}
        else:
            g = g + wd * theta
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1.0 - beta1**t)
    if hp["amsgrad"]:
        # torch keeps the running max of the *uncorrected* v and corrects it afterwards
        v_max = np.maximum(state["max_exp_avg_sq"], v)
        state["max_exp_avg_sq"] = v_max
        v_hat = v_max / (1.0 - beta2**t)
    else:
        v_hat = v / (1.0 - beta2**t)
    return theta - lr * m_hat / (np.sqrt(v_hat) + hp["eps"])


def adamw(theta, grad, state, t, lr, wd, hp):
    """AdamW: Adam's box with decoupled decay (``decoupled_weight_decay`` defaults True)."""
    return adam(theta, grad, state, t, lr, wd, hp)


#: State torch keeps per array that polyopt computes from each array's step count
#: instead of storing it (the reference keeps it, as torch's box does; tests compare
#: the slots both hold, and polyopt.torch's state dicts carry these as torch's do).
COUNTED = frozenset({"step", "mu_product", "weight_sum"})


def _decayed(theta, grad, lr, wd, hp):
    """The prelude of torch's NAdam / RAdam boxes: maximize, then L2 or decoupled decay."""
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        if hp["decoupled_weight_decay"]:
            theta = theta * (1.0 - lr * wd)
        else:
            g = g + wd * theta
    return theta, g


def nadam(theta, grad, state, t, lr, wd, hp):
    """torch.optim.NAdam's box (Dozat 2016): momentum schedule μ_t, running product."""
    beta1, beta2 = hp["betas"]
    psi = hp["momentum_decay"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
        state["exp_avg_sq"] = np.zeros_like(theta)
        state["mu_product"] = 1.0
    theta, g = _decayed(theta, grad, lr, wd, hp)
    mu_t = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    state["mu_product"] *= mu_t
    prod, prod_next = state["mu_product"], state["mu_product"] * mu_next
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    v_hat = v / (1.0 - beta2**t)
    m_nesterov = mu_next * m / (1.0 - prod_next) + (1.0 - mu_t) * g / (1.0 - prod)
    return theta - lr * m_nesterov / (np.sqrt(v_hat) + hp["eps"])


def radam(theta, grad, state, t, lr, wd, hp):
    """torch.optim.RAdam's box (Liu et al. 2020): rectify once ρ_t > 5."""
    beta1, beta2 = hp["betas"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
        state["exp_avg_sq"] = np.zeros_like(theta)
    theta, g = _decayed(theta, grad, lr, wd, hp)
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1.0 - beta1**t)
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
    if rho_t <= 5.0:
        return theta - lr * m_hat
    l_t = math.sqrt(1.0 - beta2**t) / (np.sqrt(v) + hp["eps"])
    r_t = math.sqrt(
        (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    )
    return theta - lr * m_hat * l_t * r_t


def adamax(theta, grad, state, t, lr, wd, hp):
    """torch.optim.Adamax's box (Kingma & Ba 2015, section 7.1)."""
    beta1, beta2 = hp["betas"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
        state["exp_inf"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    if wd != 0:
        g = g + wd * theta
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    u = np.maximum(beta2 * state["exp_inf"], np.abs(g) + hp["eps"])
    state["exp_avg"], state["exp_inf"] = m, u
    return theta - lr * m / ((1.0 - beta1**t) * u)


def lion(theta, grad, state, t, lr, wd, hp):
    """Lion (Chen et al. 2023, Program 1): sign of the interpolation, decoupled decay."""
    beta1, beta2 = hp["betas"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    c = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    state["exp_avg"] = beta2 * state["exp_avg"] + (1.0 - beta2) * g
    return theta - lr * (np.sign(c) + wd * theta)


def _rms(x):
    return math.sqrt(float(np.mean(x * x)))


def adafactor(theta, grad, state, t, lr, wd, hp):
    """torch.optim.Adafactor's box (Shazeer & Stern 2018 as torch writes it): the
    second moment factored over the last two axes of a matrix, relative step sizes."""
    eps1, eps2 = hp["eps"]
    eps1 = np.finfo(np.float64).eps if eps1 is None else eps1
    factored = theta.ndim >= 2
    if t == 1:
        if factored:
            state["row_var"] = np.zeros(theta.shape[:-1] + (1,))
            state["col_var"] = np.zeros(theta.shape[:-2] + (1,) + theta.shape[-1:])
        else:
            state["variance"] = np.zeros_like(theta)
    if theta.size == 0:
        return theta  # nothing to update (torch divides by zero here)
    g = -grad if hp["maximize"] else grad
    beta2_t = 1.0 - t ** hp["beta2_decay"]
    rho = min(lr, 1.0 / math.sqrt(t))
    alpha = max(eps2, _rms(theta)) * rho
    if wd != 0:
        theta = theta * (1.0 - lr * wd)
    if factored:
        r = beta2_t * state["row_var"] + (1 - beta2_t) * np.mean(g**2, axis=-1, keepdims=True)
        c = beta2_t * state["col_var"] + (1 - beta2_t) * np.mean(g**2, axis=-2, keepdims=True)
        state["row_var"], state["col_var"] = r, c
        v = r * c / np.maximum(np.mean(r, axis=-2, keepdims=True), eps1)
    else:
        v = beta2_t * state["variance"] + (1 - beta2_t) * g**2
        state["variance"] = v
    u = g / np.sqrt(np.maximum(v, eps1**2))
    return theta - alpha / max(1.0, _rms(u) / hp["d"]) * u


def lamb(theta, grad, state, t, lr, wd, hp):
    """LAMB (You et al. 2020) as optax.lamb composes it: Adam's bias-corrected direction
    plus λθ, scaled by the trust ratio ‖θ‖ / ‖u‖ (1 where either is 0)."""
    beta1, beta2 = hp["betas"]
    if t == 1:
        state["exp_avg"] = np.zeros_like(theta)
        state["exp_avg_sq"] = np.zeros_like(theta)
    g = -grad if hp["maximize"] else grad
    m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat, v_hat = m / (1.0 - beta1**t), v / (1.0 - beta2**t)
    u = m_hat / (np.sqrt(v_hat + hp["eps_root"]) + hp["eps"]) + wd * theta
    p_norm, u_norm = np.linalg.norm(theta), np.linalg.norm(u)
    ratio = 1.0 if p_norm == 0 or u_norm == 0 else p_norm / u_norm
    return theta - lr * ratio * u


def schedule_free_adamw(theta, grad, state, t, lr, wd, hp):
    """Schedule-free AdamW (Defazio et al. 2024, Algorithm 1, as optax.contrib writes
    it): the gradient at y = θ, a base step on z, x the weighted average of the z's,
    y = β1 x + (1 - β1) z; weights lr_t^power with a linear warmup of lr (the weight of
    step t uses the warmup at t, z's step at t - 1, as optax's two counters do)."""
    beta1, beta2 = hp["betas"]
    warmup, power = hp["warmup_steps"], hp["weight_lr_power"]
    if t == 1:
        state["z"] = theta.copy()
        state["exp_avg_sq"] = np.zeros_like(theta)
        state["weight_sum"] = 0.0
    # optax counts the averaging weights from 1 and z's learning rate from 0
    lr_t = lr * min(t - 1, warmup) / warmup if warmup else lr
    weight = (lr * min(t, warmup) / warmup if warmup else lr) ** power
    state["weight_sum"] += weight
    c = weight / state["weight_sum"] if state["weight_sum"] > 0 else 0.0
    v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * grad**2
    state["exp_avg_sq"] = v
    u = grad / (np.sqrt(v / (1.0 - beta2**t)) + hp["eps"]) + wd * theta
    z_old = state["z"]
    z = z_old - lr_t * u
    state["z"] = z
    x_old = (theta - (1.0 - beta1) * z_old) / beta1
    x = (1.0 - c) * x_old + c * z
    return beta1 * x + (1.0 - beta1) * z


def swats(thetas, grads, states, group, t, lr, wd, hp):
    """Keskar & Socher (2017), Algorithm 1, on the whole group as one vector w (the
    arrays joined), as the paper writes it. ``group`` holds the group's own state (the
    reference's: phase, m, a, v, λ, Λ); each array's view of it goes to ``states``."""
    b1, b2 = hp["betas"]
    eps = hp["eps"]
    sizes = [th.size for th in thetas]
    w = np.concatenate([th.ravel() for th in thetas])
    g = np.concatenate([np.ravel(x) for x in grads])
    if hp["maximize"]:
        g = -g
    g = g + wd * w  # coupled L2 (the paper has none)
    if not group:
        group.update(phase="adam", m=0 * w, a=0 * w, v=0 * w, lam=0.0, Lam=0.0, k_sw=0)
    if group["phase"] == "sgd":
        group["v"] = b1 * group["v"] + g
        w = w - (1 - b1) * group["Lam"] * group["v"]
    else:
        group["m"] = b1 * group["m"] + (1 - b1) * g
        group["a"] = b2 * group["a"] + (1 - b2) * g * g
        alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = -alpha * group["m"] / (np.sqrt(group["a"]) + eps)
        w = w + p
        if p @ g != 0:
            gamma = (p @ p) / -(p @ g)
            group["lam"] = b2 * group["lam"] + (1 - b2) * gamma
            lam_hat = group["lam"] / (1 - b2**t)
            if t > 1 and abs(lam_hat - gamma) < eps:
                group.update(phase="sgd", v=0 * w, Lam=lam_hat, k_sw=t)
    out, start = [], 0
    for i, (th, n) in enumerate(zip(thetas, sizes)):
        sl = slice(start, start + n)
        states[i].update(
            exp_avg=group["m"][sl].reshape(th.shape),
            exp_avg_sq=group["a"][sl].reshape(th.shape),
            momentum_buffer=group["v"][sl].reshape(th.shape),
            gamma_avg=np.float64(group["lam"]),
            sgd_lr=np.float64(group["Lam"]),
            switch_step=np.float64(group["k_sw"]),
        )
        out.append(w[sl].reshape(th.shape))
        start += n
    return out


#: Optimizers whose step sees the whole group at once:
#: ``(thetas, grads, states, group, t, lr, wd, hp) -> thetas``.
GROUP_STEPS: dict[str, Callable] = {"swats": swats}


STEPS: dict[str, Callable] = {
    "sgd": sgd,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adadelta": adadelta,
    "adam": adam,
    "adamw": adamw,
    "nadam": nadam,
    "radam": radam,
    "adamax": adamax,
    "lion": lion,
    "adafactor": adafactor,
    "lamb": lamb,
    "schedule_free_adamw": schedule_free_adamw,
}


def _at(value, k: int) -> float:
    return float(value(k)) if callable(value) else float(value)


def reference_run(
    name: str,
    hyperparams: dict,
    p0: Sequence[np.ndarray],
    grads_sequence: Sequence[Sequence[np.ndarray]],
) -> list[tuple[list[np.ndarray], list[dict]]]:
    """Run optimizer ``name`` over ``grads_sequence``; return (params, states) after each step.

    ``hyperparams`` override :data:`DEFAULTS`; ``lr`` and ``weight_decay`` may be
    callables of the 0-based step index k (step k uses ``lr(k)``). Every array is
    float64; nothing given is modified.
    """
    hp = {**DEFAULTS[name], **hyperparams}
    unknown = set(hyperparams) - set(DEFAULTS[name])
    if unknown:
        raise TypeError(f"reference {name} has no hyperparameter(s) {sorted(unknown)}")
    thetas = [np.array(p, dtype=np.float64, copy=True) for p in p0]
    states: list[dict] = [{} for _ in thetas]
    history = []
    group: dict = {}
    for k, grads in enumerate(grads_sequence):
        t = k + 1
        lr, wd = _at(hp["lr"], k), _at(hp["weight_decay"], k)
        if name in GROUP_STEPS:
            thetas = GROUP_STEPS[name](thetas, grads, states, group, t, lr, wd, hp)
            history.append(([th.copy() for th in thetas], copy.deepcopy(states)))
            continue
        step = STEPS[name]
        for i, g in enumerate(grads):
            thetas[i] = np.asarray(
                step(thetas[i], np.asarray(g, np.float64), states[i], t, lr, wd, hp)
            )
        history.append(([th.copy() for th in thetas], copy.deepcopy(states)))
    return history


# --------------------------------------------------------------------------------------
# Schedules, closed forms in Python math: value at the 0-based step k.
# --------------------------------------------------------------------------------------


def _cosine_value(lr, eta_min, t_cur, t_i):
    # SGDR (Loshchilov & Hutter 2017, eq. 5)
    return eta_min + 0.5 * (lr - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i))


def make_schedule(kind: str, **kw) -> Callable[[int], float]:
    """A Python-math schedule ``k -> value`` named like polyopt.schedules' functions."""
    if kind == "constant":
        return lambda k: float(kw["lr"])
    if kind == "step_decay":
        lr, size, gamma = kw["lr"], kw["step_size"], kw.get("gamma", 0.1)
        return lambda k: lr * gamma ** (k // size)
    if kind == "exponential":
        return lambda k: kw["lr"] * kw["gamma"] ** k
    if kind == "cosine":
        lr, t_max, eta_min = kw["lr"], kw["T_max"], kw.get("eta_min", 0.0)
        return lambda k: _cosine_value(lr, eta_min, k, t_max)
    if kind == "cosine_warm_restarts":
        lr, t0, mult, eta_min = kw["lr"], kw["T_0"], kw.get("T_mult", 1), kw.get("eta_min", 0.0)

        def warm(k):
            start, length = 0, t0  # period i covers [start, start + T_0 * T_mult^i)
            while k >= start + length:
                start, length = start + length, length * mult
            return _cosine_value(lr, eta_min, k - start, length)

        return warm
    if kind == "linear":
        start, end, steps = kw["start"], kw["end"], kw["steps"]
        return lambda k: start + (end - start) * (min(k, steps) / steps)
    if kind == "linear_warmup":
        lr, n, f0 = kw["lr"], kw["warmup_steps"], kw.get("start_factor", 0.0)
        return lambda k: lr * (f0 + (1.0 - f0) * min(k, n) / n)
    if kind == "join":
        parts, bounds = list(kw["schedules"]), list(kw["boundaries"])

        def joined(k):
            i = 0
            while i < len(bounds) and k >= bounds[i]:
                i += 1
            offset = bounds[i - 1] if i > 0 else 0
            return parts[i](k - offset)

        return joined
    raise ValueError(f"unknown schedule kind {kind!r}")
