"""ftctl's uses of the transformers Trainer's private methods are all in launch/run/trainer_internals.py, and each
still has the signature ftctl relies on: an upgrade of transformers that changes one fails here, by name, instead
of breaking a run midway."""

from __future__ import annotations

import inspect
import re

from transformers import Trainer

from launch.run import trainer, trainer_internals
from launch.run.trainer import FtctlTrainer
from launch.run.trainer_internals import PRIVATE, TrainerInternals


def private_of_trainer(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)


def test_the_private_methods_ftctl_relies_on_keep_their_signatures():
    changed = {}
    for name, expected in PRIVATE.items():
        method = getattr(Trainer, name, None)
        found = tuple(inspect.signature(method).parameters) if method is not None else "missing"
        if found != expected:
            changed[name] = (expected, found)
    assert not changed, f"transformers changed private Trainer methods ftctl uses: {changed}"


def test_private_overrides_live_in_one_place():
    overridden_here = {n for n in vars(TrainerInternals) if private_of_trainer(n)}
    assert overridden_here == {n for n in PRIVATE if n in vars(TrainerInternals)}
    assert not [n for n in vars(FtctlTrainer) if private_of_trainer(n)], "FtctlTrainer overrides a private method"


def test_every_private_method_called_is_listed():
    called = set()
    for module in (trainer, trainer_internals):
        called |= set(re.findall(r"self\.(_[a-z]\w*)\(", inspect.getsource(module)))
    assert {n for n in called if hasattr(Trainer, n)} <= set(PRIVATE)


def test_a_tie_on_the_best_metric_goes_to_the_lower_loss_then_the_later_step():
    from launch.run.trainer_internals import eval_loss_at, wins_tie

    history = [{"step": 23, "eval_loss": 0.54, "eval_accuracy": 0.8167}, {"step": 23, "loss": 0.6}]
    assert eval_loss_at(history, 23) == 0.54 and eval_loss_at(history, 46) is None
    assert wins_tie(0.8167, 0.8167, loss=0.385, best_loss=0.54)  # same accuracy, lower loss: the later one
    assert wins_tie(0.8167, 0.8167, loss=0.54, best_loss=0.54)  # same both: the later step
    assert not wins_tie(0.8167, 0.8167, loss=0.6, best_loss=0.54)  # higher loss: the earlier one stays
    assert not wins_tie(0.80, 0.8167, loss=0.1, best_loss=0.54)  # not a tie: the Trainer's own rule
    assert not wins_tie(0.8167, None, loss=0.1, best_loss=None)
