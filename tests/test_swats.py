"""SWATS: the switch from Adam to SGD (Keskar & Socher, 2017, Algorithm 1).

The case table holds every form and backend to tests/reference.py's ``swats`` (the
paper's algorithm run on the group's arrays joined into one vector) over 120 steps,
on gradients where the table's rows switch at steps 88, 5 and 38. Here: that the switch
happens where it must and where the paper's numbers say (a linear loss, whose Adam steps
have a constant projection, switches at step 2 with Λ = lr·n / Σ|g|), per parameter
group, that it survives checkpoints in every form, and that a group's numbers stay one
value on every array when some arrays have no gradient.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import polyopt
import reference


def _linear(n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n)


def test_linear_loss_switches_at_step_two_with_the_papers_lr():
    # f(w) = c·w: every gradient is c, m_k = (1 - β1^k) c and a_k = (1 - β2^k) c², so
    # the Adam step is -lr·c/(|c| + ε/√(1 - β2^k)) ≈ -lr·sign(c): its projection
    # γ = |p|² / (-pᵀc) = lr·n / Σ|c| from step 1 on, λ̂ equals it, and k > 1 switches.
    w0, c = _linear()
    lr = 0.05
    opt = polyopt.SWATS([w0.copy()], lr=lr)
    for _ in range(2):
        opt.step([c])
    (sw,) = polyopt.swats_switches(opt)
    assert sw["switch_step"] == 2
    np.testing.assert_allclose(sw["sgd_lr"], lr * c.size / np.abs(c).sum(), rtol=1e-6)
    # then SGD with momentum β1 from v = 0: w_k = w_{k-1} - (1 - β1) Λ v_k
    w, v = opt.params[0].copy(), np.zeros_like(w0)
    for _ in range(5):
        opt.step([c])
        v = 0.9 * v + c
        w = w - 0.1 * sw["sgd_lr"] * v
    np.testing.assert_allclose(opt.params[0], w, rtol=1e-14)
    # the Adam moments stay where the switch left them
    np.testing.assert_allclose(opt.state.slots["exp_avg"][0], 0.19 * c, rtol=1e-15)


def test_no_switch_while_the_projection_moves():
    # a quadratic: as w shrinks, the Adam step stays near lr per entry while g shrinks,
    # so γ keeps growing and never matches its average (at the paper's ε = 1e-9)
    w0, _ = _linear()
    opt = polyopt.SWATS([w0.copy()], lr=0.01)
    for _ in range(200):
        opt.step([opt.params[0].copy()])
    assert polyopt.swats_switches(opt) == [{"switch_step": None, "sgd_lr": None}]
    assert float(opt.state.slots["gamma_avg"][0]) > 0


def test_the_switch_is_per_group():
    w0, c = _linear()
    rng = np.random.default_rng(1)
    noisy = [rng.standard_normal(4) for _ in range(30)]
    groups = [dict(params=[w0.copy()]), dict(params=[np.ones(4)])]
    opt = polyopt.SWATS(groups, lr=0.05)
    for g in noisy:
        opt.step([[c], [g]])
    first, second = polyopt.swats_switches(opt)
    assert first["switch_step"] == 2
    assert second == {"switch_step": None, "sgd_lr": None}
    # the functional form reads the same from its state and the groups' sizes
    f = polyopt.swats(lr=0.05)
    params = [dict(params=[w0.copy()]), dict(params=[np.ones(4)])]
    state = f.init(params)
    for g in noisy:
        params, state = f.update(params, [[c], [g]], state)
    assert polyopt.swats_switches(f, state, params) == [first, second]
    np.testing.assert_array_equal(params[0]["params"][0], opt.param_groups[0]["params"][0])


def test_group_of_several_arrays_matches_the_reference():
    # the criterion sums over all the group's arrays (the reference joins them)
    rng = np.random.default_rng(2)
    p0 = [rng.standard_normal(3), rng.standard_normal((2, 2)), np.array(0.5)]
    grads = [[x + 0.1 * rng.standard_normal(np.shape(x)) for x in p0] for _ in range(60)]
    hp = dict(lr=0.01, eps=1e-3)
    ref = reference.reference_run("swats", hp, p0, grads)
    opt = polyopt.SWATS([x.copy() for x in p0], **hp)
    for k, g in enumerate(grads):
        opt.step(g)
        for i, (p, rp) in enumerate(zip(opt.params, ref[k][0])):
            np.testing.assert_allclose(p, rp, rtol=1e-12, atol=1e-14, err_msg=f"{k} {i}")
    assert ref[-1][1][0]["switch_step"] > 0  # the run covers both phases
    assert polyopt.swats_switches(opt)[0]["switch_step"] == ref[-1][1][0]["switch_step"]


def _switched_run(steps: int = 6):
    w0, c = _linear()
    opt = polyopt.SWATS([w0.copy(), np.zeros(3)], lr=0.05, eps=1e-5)
    for _ in range(steps):
        opt.step([c, np.ones(3)])  # a linear loss: switches at step 2
    return opt, c


def test_state_dict_round_trip_after_the_switch_is_bit_identical():
    opt, c = _switched_run()
    assert polyopt.swats_switches(opt)[0]["switch_step"] is not None
    sd = copy.deepcopy(opt.state_dict())
    clone = polyopt.SWATS([p.copy() for p in opt.params], lr=0.05, eps=1e-5)
    clone.load_state_dict(pickle.loads(pickle.dumps(sd)))
    assert polyopt.swats_switches(clone) == polyopt.swats_switches(opt)
    for k in range(4):
        g = [c, np.full(3, -0.2 * k)]
        opt.step(g)
        clone.step(g)
    for a, b in zip(opt.params, clone.params):
        np.testing.assert_array_equal(a, b)


def test_torch_adapter_keeps_the_switch_in_state_and_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    import polyopt.torch

    w0, c = _linear()
    ct = torch.tensor(c)
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = polyopt.torch.SWATS([w], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        (w * ct).sum().backward()
        opt.step()
    assert float(opt.state[w]["switch_step"]) == 2
    (sw,) = polyopt.swats_switches(opt)
    assert sw["switch_step"] == 2 and sw["sgd_lr"] == float(opt.state[w]["sgd_lr"])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = polyopt.torch.SWATS([w2], lr=0.05)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for p, o in ((w, opt), (w2, opt2)):
        for _ in range(3):
            o.zero_grad()
            (p * ct).sum().backward()
            o.step()
    assert torch.equal(w, w2)
    # the same numbers as the NumPy stateful form
    ref = polyopt.SWATS([w0.copy()], lr=0.05)
    for _ in range(7):
        ref.step([c])
    np.testing.assert_allclose(w.detach().numpy(), ref.params[0], rtol=1e-15)


def test_torch_adapter_shares_the_groups_numbers_with_params_that_had_no_grad():
    torch = pytest.importorskip("torch")
    import polyopt.torch

    rng = np.random.default_rng(3)
    a = torch.nn.Parameter(torch.tensor(rng.standard_normal(4)))
    b = torch.nn.Parameter(torch.tensor(rng.standard_normal(2)))
    opt = polyopt.torch.SWATS([a, b], lr=0.01)  # ε = 1e-9: λ moves every step
    for k in range(6):
        opt.zero_grad()
        loss = (a * torch.tensor(rng.standard_normal(4))).sum()
        if k < 2:
            loss = loss + (b * torch.tensor(rng.standard_normal(2))).sum()
        loss.backward()
        opt.step()
        for name in ("gamma_avg", "sgd_lr", "switch_step"):
            assert torch.equal(opt.state[a][name], opt.state[b][name]), (k, name)
    assert float(opt.state[b]["step"]) == 2  # b itself moved twice only


def test_jit_switches_as_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    w0, c = _linear()
    f = polyopt.swats(lr=0.05, eps=1e-6)
    update = jax.jit(f.update)
    params = [jnp.asarray(w0, jnp.float32)]
    state = f.init(params)
    for _ in range(5):
        params, state = update(params, [jnp.asarray(c, jnp.float32)], state)
    (sw,) = polyopt.swats_switches(f, state, params)
    assert sw["switch_step"] == 2
    # ε/√(1 - β2) = 3e-5 of |c| in the first steps' denominators
    np.testing.assert_allclose(sw["sgd_lr"], 0.05 * c.size / np.abs(c).sum(), rtol=1e-4)


def test_complex_params_are_refused():
    with pytest.raises(TypeError, match="swats does not take complex params"):
        polyopt.SWATS([np.ones(2, complex)])


def test_swats_switches_errors():
    with pytest.raises(TypeError, match="needs a SWATS optimizer, got Adam"):
        polyopt.swats_switches(polyopt.Adam([np.ones(2)]))
    with pytest.raises(TypeError, match="needs polyopt.swats, got polyopt.adam"):
        polyopt.swats_switches(polyopt.adam(), None, [np.ones(2)])
    f = polyopt.swats()
    with pytest.raises(TypeError, match="needs the state and the params"):
        polyopt.swats_switches(f)
    with pytest.raises(TypeError, match="got int"):
        polyopt.swats_switches(3)
