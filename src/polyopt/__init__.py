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
from .rules.adafactor import adafactor
from .rules.adagrad import adagrad
from .rules.adam import adam, adamw
from .rules.adamax import adamax
from .rules.lamb import lamb
from .rules.lion import lion
from .rules.muon import muon
from .rules.nadam import nadam
from .rules.radam import radam
from .rules.rmsprop import rmsprop
from .rules.schedule_free import schedule_free_adamw, schedule_free_eval_params
from .rules.sgd import sgd
from .rules.swats import swats, swats_switches

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
Adafactor = stateful(adafactor, "Adafactor")
Lamb = stateful(lamb, "Lamb")
ScheduleFreeAdamW = stateful(schedule_free_adamw, "ScheduleFreeAdamW")
Muon = stateful(muon, "Muon")
SWATS = stateful(swats, "SWATS")

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
    "adafactor": (adafactor, Adafactor),
    "lamb": (lamb, Lamb),
    "schedule_free_adamw": (schedule_free_adamw, ScheduleFreeAdamW),
    "muon": (muon, Muon),
    "swats": (swats, SWATS),
}

__all__ = [
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "EMA",
    "Lamb",
    "Lion",
    "Muon",
    "NAdam",
    "OPTIMIZERS",
    "OptState",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "SGD",
    "SWATS",
    "ScheduleFreeAdamW",
    "StatefulOptimizer",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ema",
    "lamb",
    "lion",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedules",
    "sgd",
    "stateful",
    "swats",
    "swats_switches",
]
