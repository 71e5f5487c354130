"""polyopt.torch inside the two common training loops: Lightning and the HF Trainer.

Each loop trains the same tiny model twice, once with ``polyopt.torch.AdamW`` and once
with ``torch.optim.AdamW``, with a torch LR scheduler stepped by the loop itself, and
the final parameters (and, for Lightning, the optimizer state) must agree:

* Lightning (``precision="64-true"``, float64): OneCycleLR with ``interval="step"``
  (it also cycles ``betas`` in the param groups), a ``ModelCheckpoint`` at an epoch
  end, and ``trainer.fit(ckpt_path=...)`` resuming to a larger ``max_steps``. The
  resumed run must equal the uninterrupted one, each must equal torch.optim's, and a
  torch.optim checkpoint must resume under polyopt.torch (state dicts move both ways).
* ``transformers.Trainer`` with ``optimizers=(polyopt.torch.AdamW(...), LambdaLR(...))``
  on a tiny GPT-2 built from a config (no download: ``HF_HUB_OFFLINE=1``), the model
  cast to float64, gradient clipping at the Trainer's default ``max_grad_norm=1.0``.

Tolerance: ``rtol = 1e-9`` with ``atol = 1e-9 * max|torch|`` per tensor, as in
tests/test_torch.py (float64 throughout; measured: Lightning params 2e-16 and Adam
moments 2e-15 relative, resumed == uninterrupted exactly; HF Trainer params 4e-13).

Each test skips cleanly when its framework is not installed.
"""

from __future__ import annotations

import os

import pytest

# Before transformers / huggingface_hub are imported anywhere (Lightning's torchmetrics
# imports transformers when it is installed): nothing here may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")

import polyopt.torch as pt  # noqa: E402

RTOL = 1e-9


def assert_params_close(actual: dict, desired: dict, what: str) -> float:
    """Every tensor within RTOL (atol RTOL * max|desired|); return the max relative diff."""
    assert actual.keys() == desired.keys(), what
    worst = 0.0
    for k in desired:
        a, d = actual[k], desired[k]
        assert a.dtype == d.dtype == torch.float64, (what, k, a.dtype, d.dtype)
        scale = float(d.abs().max()) if d.numel() else 0.0
        torch.testing.assert_close(a, d, rtol=RTOL, atol=RTOL * scale, msg=f"{what}: {k}")
        if scale:
            worst = max(worst, float((a - d).abs().max()) / scale)
    return worst


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- Lightning --------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip(
            "pytorch_lightning", reason="neither lightning nor pytorch_lightning is installed"
        )
    return pl


N_SAMPLES, BATCH = 64, 16  # 4 steps an epoch
# The checkpoint falls on an epoch end: resuming from a mid-epoch one, Lightning warns
# that a plain DataLoader is not resumable and replays the epoch from its first batch
# (measured: params then differ by ~1e-1, with torch.optim as with polyopt.torch).
FIRST_STEPS, TOTAL_STEPS = 8, 20

LIGHTNING_WARNINGS = [
    # a tiny in-process DataLoader is what this test wants
    "ignore:.*does not have many workers.*",
    # 4 batches an epoch with Trainer's default log_every_n_steps=50
    "ignore:.*number of training batches.*log_every_n_steps.*",
    # the checkpoint's ModelCheckpoint is deliberately not passed to the resuming Trainer
    "ignore:.*callbacks used to create the checkpoint need to be provided.*",
    # Lightning 2.6's own use of a torch.utils._pytree API that torch 2.13 deprecates
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
]


def _lightning_run(pl, tmp_path, opt_cls, max_steps, *, ckpt_path=None, save_every=None):
    """One ``Trainer.fit``; returns (final params, optimizer state_dict, trainer)."""
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(N_SAMPLES, 4, generator=g, dtype=torch.float64)
            self.y = (self.x @ torch.randn(4, 1, generator=g, dtype=torch.float64)).sin()
            torch.manual_seed(0)  # the same initial weights in every run
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = opt_cls(self.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=5e-2, total_steps=TOTAL_STEPS
            )  # cycle_momentum=True: it rewrites betas[0] in the param group every step
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=False)

    pl.seed_everything(0, verbose=False)
    callbacks = []
    if save_every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=tmp_path,
                every_n_train_steps=save_every,
                save_top_k=-1,
                filename="{step}",
            )
        )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(save_every),
        callbacks=callbacks,
        default_root_dir=tmp_path,
        # no deterministic=True: it turns torch.use_deterministic_algorithms on for the
        # rest of the process (every later test); nothing here is nondeterministic on CPU
    )
    # The module must be float64 from the start: with ckpt_path, Lightning loads the
    # checkpoint's weights into the module *before* precision="64-true" converts it, so
    # a module built in float32 comes back rounded to float32 (resumed != uninterrupted
    # by ~1e-8, for torch.optim as for polyopt.torch). init_module() builds it in float64.
    with trainer.init_module():
        model = Regression()
    trainer.fit(model, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    (opt,) = trainer.optimizers
    assert type(opt) is opt_cls
    return _snapshot(model), opt.state_dict(), trainer


def _assert_opt_state_close(actual: dict, desired: dict, what: str) -> None:
    assert actual["state"].keys() == desired["state"].keys(), what
    for i, d in desired["state"].items():
        a = actual["state"][i]
        assert a.keys() == d.keys(), (what, i)
        assert float(a["step"]) == float(d["step"]), (what, i)
        assert_params_close(
            {k: a[k] for k in ("exp_avg", "exp_avg_sq")},
            {k: d[k] for k in ("exp_avg", "exp_avg_sq")},
            f"{what}: state[{i}]",
        )
    for ga, gd in zip(actual["param_groups"], desired["param_groups"], strict=True):
        assert ga["lr"] == pytest.approx(gd["lr"], rel=1e-12), what
        assert ga["betas"] == pytest.approx(gd["betas"], rel=1e-12), what


@pytest.mark.filterwarnings(*LIGHTNING_WARNINGS)
def test_lightning_resume_matches_uninterrupted_and_torch(tmp_path):
    pl = _lightning()
    runs = {}
    for name, cls in (("polyopt", pt.AdamW), ("torch", torch.optim.AdamW)):
        d = tmp_path / name
        full, full_opt, _ = _lightning_run(pl, d / "full", cls, TOTAL_STEPS)
        first, _, _ = _lightning_run(pl, d / "first", cls, FIRST_STEPS, save_every=FIRST_STEPS)
        ckpt = d / "first" / f"step={FIRST_STEPS}.ckpt"
        assert ckpt.is_file(), sorted(p.name for p in (d / "first").iterdir())
        resumed, resumed_opt, _ = _lightning_run(
            pl, d / "resumed", cls, TOTAL_STEPS, ckpt_path=str(ckpt)
        )
        assert not all(torch.equal(first[k], full[k]) for k in full)  # it did train on
        runs[name] = (full, full_opt, resumed, resumed_opt, ckpt)

    full, full_opt, resumed, resumed_opt, _ = runs["polyopt"]
    t_full, t_full_opt, t_resumed, t_resumed_opt, t_ckpt = runs["torch"]
    # resuming from the checkpoint continues the same run
    assert_params_close(resumed, full, "polyopt resumed vs uninterrupted")
    _assert_opt_state_close(resumed_opt, full_opt, "polyopt resumed vs uninterrupted")
    assert_params_close(t_resumed, t_full, "torch resumed vs uninterrupted")
    # and each equals torch.optim's
    assert_params_close(full, t_full, "polyopt vs torch (uninterrupted)")
    _assert_opt_state_close(full_opt, t_full_opt, "polyopt vs torch (uninterrupted)")
    assert_params_close(resumed, t_resumed, "polyopt vs torch (resumed)")
    _assert_opt_state_close(resumed_opt, t_resumed_opt, "polyopt vs torch (resumed)")
    # torch.optim's checkpoint resumes under polyopt.torch
    cross, cross_opt, _ = _lightning_run(
        pl, tmp_path / "cross", pt.AdamW, TOTAL_STEPS, ckpt_path=str(t_ckpt)
    )
    assert_params_close(cross, t_full, "polyopt resumed from torch's checkpoint")
    _assert_opt_state_close(cross_opt, t_full_opt, "polyopt resumed from torch's checkpoint")


# -- Hugging Face Trainer ----------------------------------------------------------------

HF_STEPS = 12


def _tiny_gpt2(transformers):
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        # no dropout, so both runs do the same math
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's default 50256 lies outside the tiny vocabulary (a config warning)
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(torch.float64)


def _hf_run(transformers, tmp_path, opt_cls) -> dict:
    model = _tiny_gpt2(transformers)
    config = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (32, 8), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]

    opt = opt_cls(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 4) * (1 - s / (HF_STEPS + 1))
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=HF_STEPS,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, sched)
    )
    trainer.train()
    assert trainer.state.global_step == HF_STEPS
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert inner is opt and type(inner) is opt_cls
    assert all(float(s["step"]) == HF_STEPS for s in opt.state.values())
    return _snapshot(model)


def test_hf_trainer_matches_torch(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    init = _snapshot(_tiny_gpt2(transformers))
    ours = _hf_run(transformers, tmp_path / "polyopt", pt.AdamW)
    theirs = _hf_run(transformers, tmp_path / "torch", torch.optim.AdamW)
    assert not all(torch.equal(ours[k], init[k]) for k in init)  # it trained
    assert_params_close(ours, theirs, "HF Trainer: polyopt vs torch")
