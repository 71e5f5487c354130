"""The case table picks, for every optimizer, the rows that the tests running one
configuration per optimizer use (``testing.richest``): a new optimizer in
``polyopt.OPTIMIZERS`` without them fails here, not silently elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

import polyopt
from polyopt import testing
from polyopt.testing._cases import resolve_hyperparams

TAGS = (testing.FULL, testing.SCHEDULED)


def _slots(case) -> set:
    hp = testing.polyopt_hyperparams(case)
    return set(polyopt.OPTIMIZERS[case.name][0](**hp).init([np.ones(2)]).slots)


def _has_schedule(case) -> bool:
    found = []
    resolve_hyperparams(case, lambda kind, **args: found.append(kind))
    return bool(found)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", testing.NAMES)
def test_every_optimizer_has_one_tagged_row_with_every_state_slot(name, tag):
    case = testing.richest(name, tag)  # LookupError: add the row to the case table
    assert not case.groups and not case.missing, case.id
    # every real dtype (Adafactor's rows leave out the complex ones it refuses)
    assert case.dtypes is None or {"float64", "float32", "float16"} <= set(case.dtypes), case.id
    if tag == testing.FULL:
        assert not _has_schedule(case), f"{case.id}: numbers only"
        assert "lr" in case.hyperparams, f"{case.id}: an explicit lr (tests scale it)"
    elif polyopt.OPTIMIZERS[name][0]().rule.schedulable:
        assert _has_schedule(case), f"{case.id}: a schedule as a hyperparameter"
    else:  # an optimizer that takes no schedule: its FULL row carries both tags
        assert case is testing.richest(name), case.id
    used = set().union(*(_slots(c) for c in testing.CASES if c.name == name and not c.groups))
    assert _slots(case) == used, f"{case.id} lacks the slots {sorted(used - _slots(case))}"


def test_tags_are_known_and_rows_name_an_optimizer():
    for case in testing.CASES:
        assert set(case.tags) <= set(TAGS), case.id
        assert case.name in polyopt.OPTIMIZERS, case.id


def test_richest_names_the_optimizer_it_cannot_find():
    with pytest.raises(LookupError, match=r"one 'nosuch' row tagged 'full', has \[\]"):
        testing.richest("nosuch")


def test_every_optimizer_is_in_the_table_or_has_its_own_problems():
    assert set(testing.NAMES) | set(testing.OWN_PROBLEMS) == set(polyopt.OPTIMIZERS)
    assert not {c.name for c in testing.CASES} & set(testing.OWN_PROBLEMS)
