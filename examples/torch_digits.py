"""Train a small CNN on scikit-learn's digits with ``polyopt.torch.AdamW``.

A plain torch training loop in which the only polyopt line is the optimizer
(``polyopt.torch.AdamW`` where you would write ``torch.optim.AdamW``), next to the torch
parts it has to work with: ``OneCycleLR``, bf16 autocast on the CPU, ``GradScaler``
with ``unscale_`` and gradient clipping, and a checkpoint of model, optimizer, scheduler
and scaler that ``--resume`` continues from. Nothing is downloaded:
``sklearn.datasets.load_digits`` ships inside scikit-learn (1797 8x8 images).

With polyopt installed (``pip install -e .`` in a checkout), torch and scikit-learn::

    python examples/torch_digits.py                  # 15 epochs, ~99 % test accuracy
    python examples/torch_digits.py --quick          # 3 epochs, for CI
    python examples/torch_digits.py --resume torch-digits/checkpoint.pt

It writes ``checkpoint.pt`` (after half the epochs) and ``model.pt`` (the trained
weights) to ``--out``. A resumed run continues at the epoch and step after the
checkpoint and ends with the same weights as the run that wrote it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import polyopt.torch

BATCH_SIZE = 64


def load_data(seed: int):
    """Digits as (N, 1, 8, 8) float32 images in [0, 1], split 75 / 25 (stratified)."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)

    def images(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return images(X_tr), torch.tensor(y_tr), images(X_te), torch.tensor(y_te)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),  # 32 x 8 x 8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),  # 64 x 8 x 8
        nn.MaxPool2d(2), nn.Flatten(),  # 64 * 4 * 4
        nn.Linear(64 * 4 * 4, 10),
    )  # fmt: skip


def progress(epoch: int, epochs: int, info: str, start: float) -> None:
    """One line per epoch on stderr (redrawn in place on a terminal), as polyopt's demo."""
    filled = round(24 * epoch / epochs)
    bar = "#" * filled + "-" * (24 - filled)
    seconds = time.perf_counter() - start
    line = f"epoch [{bar}] {epoch:>{len(str(epochs))}}/{epochs} {info}  {seconds:5.1f}s"
    if sys.stderr.isatty():
        line = "\r" + line + "\x1b[K"
    if not sys.stderr.isatty() or epoch == epochs:
        line += "\n"
    sys.stderr.write(line)
    sys.stderr.flush()


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return (model(X).argmax(dim=1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default 15 (3 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run for CI")
    p.add_argument("--seed", type=int, default=0, help="data split, initial weights, batches")
    p.add_argument("--lr", type=float, default=1e-2, help="peak lr of the one-cycle schedule")
    p.add_argument("--out", default="torch-digits", help="folder for checkpoint.pt and model.pt")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    args = p.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 15)
    if epochs < 2:
        p.error(f"--epochs: must be >= 2 (the checkpoint is written midway), got {epochs}")

    # Tensors this small train fastest on one thread: measured 5-10x faster per epoch
    # than two threads on a 2-core machine with other processes running.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    X_train, y_train, X_test, y_test = load_data(args.seed)
    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)  # the last batch is smaller
    model = make_model()
    # The one polyopt line: torch.optim.AdamW would take the same arguments.
    opt = polyopt.torch.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch
    )
    # bf16 has float32's range, so it needs no loss scaling; the scaler is here to show
    # the float16 recipe (scale, unscale_ before clipping, skip steps with inf grads).
    scaler = torch.amp.GradScaler("cpu")

    first_epoch, step = 1, 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=True)
        if ckpt["epochs"] != epochs or ckpt["seed"] != args.seed:
            p.error(
                f"--resume: the checkpoint is of a run with --epochs {ckpt['epochs']} "
                f"--seed {ckpt['seed']}; pass the same"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        first_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        print(f"resumed from {args.resume}: epoch {ckpt['epoch']}, step {step}")
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        # The batch order depends on (seed, epoch) only, so a resumed run sees the same batches.
        shuffle = torch.Generator().manual_seed(1000 * args.seed + epoch)
        order = torch.randperm(len(y_train), generator=shuffle)
        total = 0.0
        for idx in order.split(BATCH_SIZE):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(X_train[idx]), y_train[idx])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the grads are true gradients from here on: clip them
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            total += loss.item() * len(idx)
        model.eval()
        info = f"loss {total / len(y_train):.4f}  test acc {accuracy(model, X_test, y_test):.3f}"
        progress(epoch, epochs, info, start)
        if epoch == epochs // 2:
            path = os.path.join(args.out, "checkpoint.pt")
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "step": step, "epochs": epochs, "seed": args.seed},
                path,
            )  # fmt: skip
            print(f"checkpoint: {path} (epoch {epoch}, step {step})")

    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    acc = accuracy(model, X_test, y_test)
    print(f"trained {epochs} epochs, {step} steps in {time.perf_counter() - start:.1f}s")
    print(f"test accuracy: {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)})")
    return acc


if __name__ == "__main__":
    main()
