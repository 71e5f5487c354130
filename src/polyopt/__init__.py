"""polyopt: gradient-descent optimizers written once against the Python array API.

Every optimizer comes in two forms made from one definition::

    opt = polyopt.adamw(lr=1e-3)              # functional: pure init / update
    state = opt.init(params)
    params, state = opt.update(params, grads, state)

    opt = polyopt.AdamW(params, lr=1e-3)      # stateful, torch-like
    opt.step(grads)

They run on NumPy, CuPy, PyTorch, JAX and any array library array-api-compat knows.
"""

from . import schedules
from ._base import Optimizer, OptState, StatefulOptimizer, stateful
from .ema import EMA, ema
from .rules.adadelta import adadelta
from .rules.adagrad import adagrad
from .rules.adam import adam, adamw
from .rules.adamax import adamax
from .rules.lion import lion
from .rules.nadam import nadam
from .rules.radam import radam
from .rules.rmsprop import rmsprop
from .rules.sgd import sgd

__version__ = "0.1.0"

SGD = stateful(sgd, "SGD")
Adagrad = stateful(adagrad, "Adagrad")
RMSprop = stateful(rmsprop, "RMSprop")
Adadelta = stateful(adadelta, "Adadelta")
Adam = stateful(adam, "Adam")
AdamW = stateful(adamw, "AdamW")
NAdam = stateful(nadam, "NAdam")
RAdam = stateful(radam, "RAdam")
Adamax = stateful(adamax, "Adamax")
Lion = stateful(lion, "Lion")

#: Every optimizer: (functional factory, stateful class). Tests hold each to the table.
OPTIMIZERS = {
    "sgd": (sgd, SGD),
    "adagrad": (adagrad, Adagrad),
    "rmsprop": (rmsprop, RMSprop),
    "adadelta": (adadelta, Adadelta),
    "adam": (adam, Adam),
    "adamw": (adamw, AdamW),
    "nadam": (nadam, NAdam),
    "radam": (radam, RAdam),
    "adamax": (adamax, Adamax),
    "lion": (lion, Lion),
}

__all__ = [
    "EMA",
    "OPTIMIZERS",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "NAdam",
    "RAdam",
    "OptState",
    "Optimizer",
    "RMSprop",
    "StatefulOptimizer",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ema",
    "lion",
    "nadam",
    "radam",
    "rmsprop",
    "schedules",
    "sgd",
    "stateful",
]
