"""``polyopt paper``: the model's hand-written gradients, the optimizers in the paper's
convention, the measurement of the best λ and its slope, the two backends agreeing, and
``--quick`` end to end (that it produces the figures and numbers, not their values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

from polyopt import __main__ as cli  # noqa: E402
from polyopt import paper  # noqa: E402


def _tiny(seed=0, n=9, sizes=(6, 5, 4)):
    rng = np.random.default_rng(seed)
    params = paper.init_params(sizes, seed)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    X = rng.standard_normal((n, sizes[0]))
    Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    return params, X, Y


def _loss(params, X, Y):
    z = paper.logits(params, X, np)
    m = z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z - m).sum(axis=1)) + m[:, 0] - (z * Y).sum(axis=1)))


def test_gradients_match_finite_differences():
    params, X, Y = _tiny()
    loss, grads = paper.loss_and_grads(params, X, Y, np)
    assert loss == pytest.approx(_loss(params, X, Y), rel=1e-12)
    h = 1e-6
    for name, p in params.items():
        fd = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            up = _loss(params, X, Y)
            p[idx] = old - h
            down = _loss(params, X, Y)
            p[idx] = old
            fd[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-5, atol=1e-8, err_msg=name)


def test_loss_is_invariant_to_the_scale_of_W1():
    # the layer norm's purpose: W1 behaves like the BN-followed weights of the paper's nets
    params, X, Y = _tiny()
    # (exactly so but for LN_EPS, added to the variance)
    scaled = {**params, "W1": 7.0 * params["W1"]}
    assert _loss(scaled, X, Y) == pytest.approx(_loss(params, X, Y), rel=1e-4)
    assert _loss(scaled, X, Y) != pytest.approx(_loss({**params, "W2": 7.0 * params["W2"]}, X, Y))


@pytest.mark.parametrize("key", ["sgdw", "adamw"])
def test_decoupled_decay_is_the_papers_convention(key):
    """Decoupled methods take the paper's λ: p ← p − η_t·λ·p, not scaled by α. Written
    out from the paper's Algorithms 1 and 2 (momentum as torch, m = 0.9·m + g)."""
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(4)]
    alpha, lam, T = 0.05, 0.02, 4
    eta = paper._eta("cosine", T, 1)
    opt = paper.make_optimizer(paper.METHODS[key], alpha, lam, eta)
    p, state = p0.copy(), opt.init(p0)
    ref, m, v = p0.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads):
        p, state = opt.update(p, g, state)
        e = eta(t)
        if key == "sgdw":
            m = 0.9 * m + g if t else g
            ref = ref - e * lam * ref - e * alpha * m
        else:
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            mh, vh = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
            ref = ref - e * lam * ref - e * alpha * mh / (np.sqrt(vh) + 1e-8)
        np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-15)


def test_best_lambda_finds_the_vertex_and_flags_the_edges():
    lams = 1e-4 * 2.0 ** np.arange(8)
    x = np.log(lams)
    true = np.log(np.array([3.3e-4, 1.7e-3]))
    err = (x[None, :] - true[:, None]) ** 2  # parabolas in log λ: exact vertices
    best, edge = paper.best_lambda(err, lams)
    np.testing.assert_allclose(np.log(best), true, atol=1e-9)
    assert not edge.any()
    best, edge = paper.best_lambda(np.arange(8.0)[None], lams)  # minimum at the first λ
    assert edge.tolist() == [True] and best[0] == pytest.approx(lams[0])


@pytest.mark.parametrize("k", [-1.0, 0.0, 0.5])
def test_slope_recovers_a_known_power_law(k):
    lrs = 0.01 * 2.0 ** np.arange(5)
    lams = 1e-5 * 2.0 ** np.arange(14)
    centre = np.log(2e-3) + k * np.log(lrs / lrs[0])  # inside the grid for every k
    rng = np.random.default_rng(0)
    err = (np.log(lams)[None, :, None] - centre[:, None, None]) ** 2 + 0.01 * rng.random((5, 14, 4))
    fit = paper.slope_with_interval(err, lrs, lams, n_boot=100)
    assert fit["slope"] == pytest.approx(k, abs=0.05)
    assert fit["interval"][0] <= fit["slope"] <= fit["interval"][1]


def test_restart_ends():
    assert paper.restart_ends(3, 45) == [3, 9, 21, 45]
    assert paper.restart_ends(2, 10) == [2, 6]
    # the documented plan ends a period on its last epoch, so AdamWR's last point is a
    # restart point and compares with the cosine run's end
    assert paper.restart_ends(paper.FULL.restart_T0, paper.FULL.epochs)[-1] == paper.FULL.epochs


def _tiny_data(n_train=60, n_test=40, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_train + n_test, d)).astype(np.float32)
    y = rng.integers(0, 10, n_train + n_test)
    return {
        "X_train": X[:n_train],
        "y_train": y[:n_train],
        "X_test": X[n_train:],
        "y_test": y[n_train:],
    }


@pytest.mark.parametrize("key", list(paper.METHODS))
def test_jax_grid_equals_numpy_runs(key):
    """One vmapped JAX program over the grid against each configuration trained alone
    with polyopt's stateful NumPy optimizer: the same training losses."""
    pytest.importorskip("jax")
    method = paper.METHODS[key]
    lrs = (0.05, 0.2) if method.family == "sgd" else (2e-3, 8e-3)
    job = paper._grid_job(method, lrs, [1e-3, 3e-2], 2, 3, every_epoch=True)
    data = _tiny_data()
    kw = dict(hidden=8, batch_size=20)
    j = paper.train_grid(job, data, backend="jax", **kw)
    n = paper.train_grid(job, data, backend="numpy", **kw)
    np.testing.assert_allclose(j["train_loss"], n["train_loss"], rtol=2e-4)
    assert np.isfinite(j["test_err"]).all() and np.isfinite(n["test_err"]).all()


def test_load_mnist():
    data = paper.load_mnist(n_train=1000)
    assert data["X_train"].shape == (1000, 196) and data["X_test"].shape == (4000, 196)
    assert data["X_train"].dtype == np.float32
    assert set(np.unique(data["y_train"])) == set(range(10))
    assert not set(map(bytes, data["X_train"][:50])) & set(map(bytes, data["X_test"]))
    with pytest.raises(ValueError, match="n_train must be"):
        paper.load_mnist(n_train=5000)
    with pytest.raises(ValueError, match="pool must divide 28"):
        paper.load_mnist(pool=3)


def test_quick_run_writes_figures_and_numbers(tmp_path, capsys):
    pytest.importorskip("jax")
    out = tmp_path / "paper"
    assert cli.main(["paper", "--quick", "-q", "--out", str(out)]) == 0
    for name in ("landscapes.png", "restarts.png", "normalized.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    results = json.loads((out / "results.json").read_text())
    assert set(results["landscapes"]) == set(paper.METHODS)
    for r in results["landscapes"].values():
        assert math.isfinite(r["slope"]) and len(r["interval"]) == 2
        assert np.shape(r["test_err"]) == (len(r["lrs"]), len(r["lams"]))
    assert [row["epoch"] for row in results["restarts"]["at_restarts"]] == [1, 3]
    assert math.isfinite(results["normalized"]["ratio_norm"])
    text = capsys.readouterr().out
    assert "slope of log(best λ)" in text and "AdamWR" in text
    assert (out / "report.md").read_text() in text


def test_bad_arguments_are_usage_errors(capsys):
    assert cli.main(["paper", "--backend", "tensorflow"]) == 2
    assert "unknown backend 'tensorflow'" in capsys.readouterr().err
    assert cli.main(["paper", "--decay-scope", "b2"]) == 2
    assert "unknown decay scope 'b2'" in capsys.readouterr().err
    assert cli.main(["paper", "--seeds", "0"]) == 2
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend must be one of"):
        paper.train_grid(
            paper._grid_job(paper.METHODS["sgdw"], [0.1], [0.1], 1, 1), _tiny_data(), backend="cupy"
        )


@pytest.mark.parametrize("key", ["sgd_l2", "adamw"])
def test_decay_scope_w1_regularizes_w1_only(key):
    """``scope="W1"``: W1 steps as with the decay, W2 and b2 as with none, in both forms."""
    method = paper.METHODS[key]
    params, X, Y = _tiny()
    _, grads = paper.loss_and_grads(params, X, Y, np)
    eta = paper._eta("cosine", 10, 1)
    alpha, lam = 0.01, 0.5

    def one_step(scope=None, lam_=lam, form="functional"):
        p = {k: v.copy() for k, v in params.items()}
        if form == "stateful":
            opt = paper.make_optimizer(method, alpha, lam_, eta, params=p, scope=scope)
            opt.step(grads)
            return p
        opt = paper.make_optimizer(method, alpha, lam_, eta, scope=scope or "all")
        return opt.update(p, grads, opt.init(p))[0]

    decayed, plain = one_step("all"), one_step("all", lam_=0.0)
    for form in ("functional", "stateful"):
        split = one_step("W1", form=form)
        np.testing.assert_array_equal(split["W1"], decayed["W1"])
        for k in ("W2", "b2"):
            np.testing.assert_array_equal(split[k], plain[k])
    assert not np.array_equal(decayed["W2"], plain["W2"])  # the decay did act on W2
    with pytest.raises(ValueError, match="scope must be one of"):
        paper.make_optimizer(method, alpha, lam, eta, scope="W2")


def test_jax_grid_equals_numpy_runs_with_decay_scope_w1():
    pytest.importorskip("jax")
    job = paper._grid_job(paper.METHODS["sgdw"], (0.05,), [3e-2], 2, 2, scope="W1")
    data, kw = _tiny_data(), dict(hidden=8, batch_size=20)
    j = paper.train_grid(job, data, backend="jax", **kw)
    n = paper.train_grid(job, data, backend="numpy", **kw)
    np.testing.assert_allclose(j["train_loss"], n["train_loss"], rtol=2e-4)


def test_for_scope_widens_the_grids_for_w1_only():
    plan = paper.for_scope(paper.FULL, "W1")
    assert plan.scope == "W1" and paper.for_scope(paper.FULL, "all") == paper.FULL
    f = paper.W1_GRID_FACTOR
    for k, lams in paper.FULL.lams.items():
        np.testing.assert_allclose(plan.lams[k], np.asarray(lams) * f)
    np.testing.assert_allclose(plan.lam_norms, np.asarray(paper.FULL.lam_norms) * f / 2)
    with pytest.raises(ValueError, match="scope must be one of"):
        paper.for_scope(paper.FULL, "b2")
