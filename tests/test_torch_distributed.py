"""polyopt.torch inside torch's distributed stack, each run against torch.optim.

The three scenarios share one spawned group: two CPU ranks (gloo, 127.0.0.1, a free port
found at runtime) that run DDP, ZeRO and FSDP2 one after the other, so the interpreters,
``import torch`` and the process group are paid for once (they were most of a separate
launch per test). In each scenario the ranks run the same training twice: once with
``polyopt.torch.AdamW`` and once with ``torch.optim.AdamW``, from the same seeded float64
model on the same per-rank data. The ranks write each scenario's results (plain tensors)
to a directory; the parent loads them and each test checks its own scenario. Under
pytest-xdist the group is launched once per session, by whichever worker asks first (a
file lock), and the other worker reads the same results.

* DDP: both ranks end with bit-identical params, equal to the torch.optim run.
* ZeroRedundancyOptimizer with ``optimizer_class=polyopt.torch.AdamW``: each rank's
  local optimizer is a polyopt one holding only its partition; the consolidated state
  dict matches torch's, loads into a fresh ZeRO optimizer of either class, and training
  continues exactly as the uninterrupted run.
* FSDP2 (``fully_shard``, DTensor params): params equal torch's, the optimizer state
  is DTensors sharded like the params, and a ``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict`` round trip into a fresh model resumes exactly.

ZeRO and FSDP2 shard *which rank* updates each element, not the arithmetic of an
element's update, so the tolerance is the same everywhere: ``rtol = 1e-9``,
``atol = 1e-12`` (float64; polyopt and torch order some operations differently, which
gives differences of ~1e-16 relative).

A spawned child runs this file with ``runpy.run_path`` (a stdlib function, so it pickles
by reference whatever name pytest's import mode gave this module); the block at the
bottom then runs the rank's scenarios.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import runpy
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
if not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed has no gloo backend in this build", allow_module_level=True)

# one launch of two fresh interpreters importing torch, ~20 s for the three scenarios;
# "slow" is registered in pyproject.toml's [tool.pytest.ini_options] markers.
pytestmark = pytest.mark.slow

WORLD = 2
TIMEOUT_S = 120  # per collective (gloo), and per scenario on top of the ranks' start-up
RTOL, ATOL = 1e-9, 1e-12
HP = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
STEPS = 5  # DDP
K, M = 3, 3  # ZeRO / FSDP2: steps before the checkpoint, steps after it
_WORKER = "__polyopt_distributed_worker__"  # run_name of the children's run of this file


# -- what every rank trains ------------------------------------------------------------


def _mlp() -> torch.nn.Sequential:
    """The same float64 MLP on every rank and in every run (seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def _train(model: torch.nn.Module, opt, rank: int, start: int, stop: int) -> None:
    """Steps ``start .. stop - 1``; each rank draws its own batch for each step."""
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        y = torch.randn(6, 3, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _params(model: torch.nn.Module) -> list:
    """The full params as plain tensors (DTensors are gathered)."""
    from torch.distributed.tensor import DTensor

    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def _classes() -> tuple:
    import polyopt.torch

    return (("torch", torch.optim.AdamW), ("polyopt", polyopt.torch.AdamW))


# -- the scenarios (run on each rank; return what the parent checks) ---------------------


def _ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name, cls in _classes():
        model = DistributedDataParallel(_mlp())
        opt = cls(model.parameters(), **HP)
        _train(model, opt, rank, 0, STEPS)
        out[name] = _params(model.module)
        out[f"{name}/state"] = [
            opt.state[p][k].clone()
            for p in model.module.parameters()
            for k in ("step", "exp_avg", "exp_avg_sq")
        ]
    out["init"] = _params(_mlp())
    return out


def _zero(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    classes = dict(_classes())

    def build(cls, model_state=None):
        module = _mlp()
        if model_state is not None:
            module.load_state_dict(model_state)
        model = DistributedDataParallel(module)
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **HP)

    out, ckpt = {}, {}
    for name, cls in classes.items():
        # uninterrupted
        model, opt = build(cls)
        _train(model, opt, rank, 0, K + M)
        out[f"{name}/straight"] = _params(model.module)
        # the local optimizer is the chosen class, holding this rank's partition only
        out[f"{name}/local_is_cls"] = type(opt.optim) is cls
        out[f"{name}/local_params"] = sum(len(g["params"]) for g in opt.optim.param_groups)
        # K steps, then the consolidated checkpoint (made on rank 0, sent to every rank)
        model, opt = build(cls)
        _train(model, opt, rank, 0, K)
        opt.consolidate_state_dict(to=0)
        box = [opt.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        ckpt[name] = (box[0], copy.deepcopy(model.module.state_dict()))
        out[f"{name}/ckpt"] = box[0]
    # resume each class from each class's checkpoint: fresh model, fresh ZeRO optimizer
    for name, cls in classes.items():
        for src in classes:
            opt_state, model_state = copy.deepcopy(ckpt[src])
            model, opt = build(cls, model_state)
            opt.load_state_dict(opt_state)
            _train(model, opt, rank, K, K + M)
            out[f"{name}/from_{src}"] = _params(model.module)
    return out


def _fsdp(rank: int) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    classes = dict(_classes())

    def build(cls):
        model = _mlp()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **HP)

    def clone(tree):  # the saved state must not follow the live run's in-place updates
        if isinstance(tree, dict):
            return {k: clone(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(clone(v) for v in tree)
        return tree.detach().clone() if isinstance(tree, torch.Tensor) else copy.deepcopy(tree)

    out, ckpt = {}, {}
    for name, cls in classes.items():
        model, opt = build(cls)
        _train(model, opt, rank, 0, K)
        ckpt[name] = (
            clone(get_model_state_dict(model)),
            clone(get_optimizer_state_dict(model, opt)),
        )
        _train(model, opt, rank, K, K + M)
        out[f"{name}/straight"] = _params(model)
        # the state stays sharded: DTensors laid out as their param, a smaller local shard
        layout = []
        for p in model.parameters():
            for slot in ("exp_avg", "exp_avg_sq"):
                s = opt.state[p][slot]
                layout.append(
                    (
                        isinstance(p, DTensor) and isinstance(s, DTensor),
                        tuple(s.shape) == tuple(p.shape),
                        s.placements == p.placements if isinstance(s, DTensor) else False,
                        s.to_local().numel() if isinstance(s, DTensor) else s.numel(),
                        p.numel(),
                    )
                )
        out[f"{name}/layout"] = layout
        out[f"{name}/state"] = [
            opt.state[p][k].full_tensor()
            for p in model.parameters()
            for k in ("exp_avg", "exp_avg_sq")
        ]
    # fresh model + optimizer of each class, set from each class's checkpoint, M more steps
    for name, cls in classes.items():
        for src in classes:
            model_state, optim_state = clone(ckpt[src])
            model, opt = build(cls)
            set_model_state_dict(model, model_state)
            set_optimizer_state_dict(model, opt, optim_state)
            _train(model, opt, rank, K, K + M)
            out[f"{name}/from_{src}"] = _params(model)
    return out


_SCENARIOS = {"ddp": _ddp, "zero": _zero, "fsdp": _fsdp}


def _child(scenarios: list, rank: int, port: int, out: str) -> None:
    """One rank: join the group, run the scenarios in order, writing
    ``<scenario>.rank<r>.pt`` after each (or ``<scenario>.rank<r>.err`` and stop: the
    other rank may be waiting in a collective of the failed one)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two cores
    scenario = "init_process_group"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=TIMEOUT_S),
        )
        try:
            for scenario in scenarios:
                result = _SCENARIOS[scenario](rank)
                torch.save(result, Path(out) / f"{scenario}.rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"{scenario}.rank{rank}.err").write_text(traceback.format_exc())
        raise


# -- the parent side -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenarios: list, out: Path) -> dict:
    """Runs ``scenarios`` in order on WORLD spawned ranks, which write their results under
    ``out``; returns ``{"timed_out": bool, "exit_codes": [...]}`` (also written to
    ``out / "launch.json"``). Stops at a rank's failure or past the deadline (TIMEOUT_S a
    scenario, plus TIMEOUT_S for the start-up); never leaves a child behind."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(
            target=runpy.run_path,
            args=(__file__,),
            kwargs={
                "run_name": _WORKER,
                "init_globals": {"_JOB": (list(scenarios), rank, port, str(out))},
            },
            daemon=True,
        )
        for rank in range(WORLD)
    ]
    timed_out = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + TIMEOUT_S * (1 + len(scenarios))
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a rank failed: the others would wait for it in a collective
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    outcome = {"timed_out": timed_out, "exit_codes": [p.exitcode for p in procs]}
    (out / "launch.json").write_text(json.dumps(outcome))
    return outcome


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The directory holding the one launch's results. Under pytest-xdist the directory
    is shared by the workers of this session (the parent of their base temp dirs): the
    first worker to take the lock launches, the others find ``launch.json`` and read."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp("torch_distributed")
        _launch(list(_SCENARIOS), out)
        return out
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp().parent
    out = root / "torch_distributed"
    with FileLock(str(root / "torch_distributed.lock")):
        if not (out / "launch.json").exists():
            out.mkdir(exist_ok=True)
            _launch(list(_SCENARIOS), out)
    return out


def _ranks(scenario: str, out: Path) -> list[dict]:
    """Each rank's result of ``scenario`` from the launch in ``out``; fails the test with
    the rank's traceback, or with why the scenario has no result."""
    found = [out / f"{scenario}.rank{r}.pt" for r in range(WORLD)]
    if all(f.exists() for f in found):
        return [torch.load(f) for f in found]
    for pattern, why in ((f"{scenario}.rank*.err", "a rank raised"), ("*.err", "not run")):
        errors = [f"{e.name}:\n{e.read_text()}" for e in sorted(out.glob(pattern))]
        if errors:
            pytest.fail(f"{scenario}: {why}:\n" + "\n".join(errors), pytrace=False)
    outcome = json.loads((out / "launch.json").read_text())
    if outcome["timed_out"]:
        pytest.fail(
            f"{scenario}: the ranks did not finish in {TIMEOUT_S} s a scenario", pytrace=False
        )
    pytest.fail(f"{scenario}: no result; rank exit codes {outcome['exit_codes']}", pytrace=False)


def _close(actual: list, expected: list, what: str) -> float:
    """assert_close on two lists of tensors at RTOL / ATOL; returns the max abs diff."""
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    diff = max(float((a.double() - e.double()).abs().max()) for a, e in zip(actual, expected))
    print(f"{what}: max |polyopt - torch| = {diff:.3g}")
    return diff


def _flat(tree) -> list:
    """The tensors of a (state dict) tree, in a fixed order."""
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _flat(tree[k])]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in _flat(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


def _strip(tree):
    """A tree with its tensors replaced by their shape and dtype (for structure checks)."""
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_strip(v) for v in tree]
    return (tuple(tree.shape), tree.dtype) if isinstance(tree, torch.Tensor) else tree


# -- the tests -------------------------------------------------------------------------


def test_ddp_adamw(launched):
    """DDP, 2 ranks: polyopt.torch.AdamW leaves both ranks with the same params (bit for
    bit: DDP all-reduces the grads, the step is deterministic), equal to torch.optim's,
    and the same optimizer state."""
    ranks = _ranks("ddp", launched)
    for r, res in enumerate(ranks):
        _close(res["polyopt"], res["torch"], f"rank {r} params")
        _close(res["polyopt/state"], res["torch/state"], f"rank {r} state")
        assert any(not torch.equal(a, b) for a, b in zip(res["polyopt"], res["init"]))
    for name in ("polyopt", "torch"):
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert torch.equal(a, b), f"{name}: the ranks' params differ"


def test_zero_redundancy_optimizer(launched):
    """ZeroRedundancyOptimizer(optimizer_class=polyopt.torch.AdamW), 2 ranks: params equal
    torch.optim's; the consolidated state dict (K steps) equals torch's; loaded into a
    fresh ZeRO optimizer of either class, M more steps give the uninterrupted run."""
    ranks = _ranks("zero", launched)
    for r, res in enumerate(ranks):
        assert res["polyopt/local_is_cls"] and res["torch/local_is_cls"]
        # the partition: each rank's local optimizer holds some, not all, of the 4 params
        n_params = len(res["torch/straight"])
        assert 0 < res["polyopt/local_params"] < n_params
        assert res["polyopt/local_params"] == res["torch/local_params"]
        ref = res["torch/straight"]
        _close(res["polyopt/straight"], ref, f"rank {r} uninterrupted")
        for name in ("polyopt", "torch"):
            for src in ("polyopt", "torch"):
                _close(res[f"{name}/from_{src}"], ref, f"rank {r} {name} resumed from {src}")
    for a, b in zip(ranks[0]["polyopt/straight"], ranks[1]["polyopt/straight"]):
        assert torch.equal(a, b), "the ranks' params differ"
    # the consolidated checkpoints: same layout, keys, step counts and slots as torch's
    ckpt, ref = ranks[0]["polyopt/ckpt"], ranks[0]["torch/ckpt"]
    assert _strip(ckpt) == _strip(ref)
    _close(_flat(ckpt), _flat(ref), "consolidated state dict")


def test_fsdp2_fully_shard(launched):
    """FSDP2 (fully_shard, DTensor params), 2 ranks: params and state equal torch.optim's;
    the state is DTensors sharded as the params; get_optimizer_state_dict after K steps,
    set_optimizer_state_dict into a fresh model + optimizer (of either class), M more
    steps give the uninterrupted run."""
    ranks = _ranks("fsdp", launched)
    for r, res in enumerate(ranks):
        ref = res["torch/straight"]
        _close(res["polyopt/straight"], ref, f"rank {r} uninterrupted")
        _close(res["polyopt/state"], res["torch/state"], f"rank {r} state")
        for name in ("polyopt", "torch"):
            for src in ("polyopt", "torch"):
                _close(res[f"{name}/from_{src}"], ref, f"rank {r} {name} resumed from {src}")
        for is_dtensor, full_shape, same_placements, local, full in res["polyopt/layout"]:
            assert is_dtensor and full_shape and same_placements
            assert 0 < local < full, "the optimizer state is not sharded"
        assert res["polyopt/layout"] == res["torch/layout"]
    for a, b in zip(ranks[0]["polyopt/straight"], ranks[1]["polyopt/straight"]):
        assert torch.equal(a, b), "the ranks' params differ"


if __name__ == _WORKER:  # a spawned rank (see _launch)
    _child(*globals()["_JOB"])
