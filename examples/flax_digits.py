"""Train a small CNN on scikit-learn's digits with ``polyopt.optax.adamw`` and flax nnx.

A plain flax nnx training loop in which the only polyopt line is the optimizer
(``polyopt.optax.adamw(lr=...)`` where you would write ``optax.adamw(...)``), next to
the optax and flax parts it has to work with: ``optax.chain`` with gradient clipping,
an optax warmup-cosine schedule, a weight-decay mask that leaves the biases alone,
``nnx.Optimizer``, ``nnx.jit``, and an Orbax checkpoint of model, optimizer state,
epoch and step that ``--resume`` continues from. Nothing is downloaded:
``sklearn.datasets.load_digits`` ships inside scikit-learn (1797 8x8 images).

With polyopt installed (``pip install -e .`` in a checkout), jax, flax, optax, Orbax and
scikit-learn::

    python examples/flax_digits.py                   # 15 epochs, ~99 % test accuracy
    python examples/flax_digits.py --quick           # 3 epochs, for CI
    python examples/flax_digits.py --resume flax-digits/checkpoint

It writes ``checkpoint`` (after half the epochs) and ``model`` (the trained weights),
both Orbax checkpoints, to ``--out``. A resumed run continues at the epoch and step
after the checkpoint and ends with the same weights as the run that wrote it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import polyopt.optax

BATCH_SIZE = 64


def load_data(seed: int):
    """Digits as (N, 8, 8, 1) float32 images in [0, 1] (NHWC, flax's layout), split 75 / 25."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)

    def images(a):
        return jnp.asarray(a.reshape(-1, 8, 8, 1) / 16.0, dtype=jnp.float32)

    return images(X_tr), jnp.asarray(y_tr), images(X_te), jnp.asarray(y_te)


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)  # 8 x 8 x 32 ('SAME' padding)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)  # 8 x 8 x 64
        self.linear = nnx.Linear(4 * 4 * 64, 10, rngs=rngs)  # after a 2 x 2 max pool

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.linear(x.reshape(x.shape[0], -1))


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


def decay_mask(params):
    """Weight decay for the conv kernels and the linear weights (ndim > 1), not the biases."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)  # tx.update(grads, opt_state, params), then apply_updates
    return loss


@nnx.jit
def accuracy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return (model(x).argmax(axis=1) == y).mean()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default 15 (3 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run for CI")
    p.add_argument("--seed", type=int, default=0, help="data split, initial weights, batches")
    p.add_argument("--lr", type=float, default=1e-2, help="peak lr of the warmup-cosine schedule")
    p.add_argument("--out", default="flax-digits", help="folder for checkpoint/ and model/")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    args = p.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 15)
    if epochs < 2:
        p.error(f"--epochs: must be >= 2 (the checkpoint is written midway), got {epochs}")

    X_train, y_train, X_test, y_test = load_data(args.seed)
    # Every batch has BATCH_SIZE images (the last 1347 % 64 = 3 of each shuffle are left
    # out), so nnx.jit compiles the step once.
    steps_per_epoch = len(y_train) // BATCH_SIZE
    model = CNN(nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=args.lr, warmup_steps=steps_per_epoch,
        decay_steps=epochs * steps_per_epoch, end_value=args.lr / 100,
    )  # fmt: skip
    # The one polyopt line: optax.adamw(learning_rate=schedule, weight_decay=1e-2,
    # mask=decay_mask) would take the same values (see docs/optax.md for the names).
    adamw = polyopt.optax.adamw(lr=schedule, weight_decay=1e-2, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    checkpointer = ocp.StandardCheckpointer()
    first_epoch, step = 1, 0
    if args.resume:
        # The current model and optimizer give the tree, shapes and dtypes to restore into.
        target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
                  "epoch": 0, "step": 0, "epochs": 0, "seed": 0}  # fmt: skip
        ckpt = checkpointer.restore(os.path.abspath(args.resume), target)
        if int(ckpt["epochs"]) != epochs or int(ckpt["seed"]) != args.seed:
            p.error(
                f"--resume: the checkpoint is of a run with --epochs {int(ckpt['epochs'])} "
                f"--seed {int(ckpt['seed'])}; pass the same"
            )
        nnx.update(model, ckpt["model"])
        nnx.update(optimizer, ckpt["optimizer"])
        done, step = int(ckpt["epoch"]), int(ckpt["step"])
        first_epoch = done + 1
        print(f"resumed from {args.resume}: epoch {done}, step {step}")
    out = os.path.abspath(args.out)  # Orbax takes absolute paths
    os.makedirs(out, exist_ok=True)

    start = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        # The batch order depends on (seed, epoch) only, so a resumed run sees the same batches.
        order = np.random.default_rng([args.seed, epoch]).permutation(len(y_train))
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            total += float(train_step(model, optimizer, X_train[idx], y_train[idx]))
            step += 1
        acc = float(accuracy(model, X_test, y_test))
        info = f"loss {total / steps_per_epoch:.4f}  test acc {acc:.3f}"
        progress(epoch, epochs, info, start)
        if epoch == epochs // 2:
            path = os.path.join(out, "checkpoint")
            checkpointer.save(
                path,
                {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
                 "epoch": epoch, "step": step, "epochs": epochs, "seed": args.seed},
                force=True,
            )  # fmt: skip
            checkpointer.wait_until_finished()  # it writes in a background thread
            print(f"checkpoint: {path} (epoch {epoch}, step {step})")

    checkpointer.save(os.path.join(out, "model"), nnx.state(model), force=True)
    checkpointer.wait_until_finished()
    acc = float(accuracy(model, X_test, y_test))
    print(f"trained {epochs} epochs, {step} steps in {time.perf_counter() - start:.1f}s")
    print(f"test accuracy: {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)})")
    return acc


if __name__ == "__main__":
    main()
