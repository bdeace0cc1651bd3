"""Closed vocabularies: the architecture families and the task kinds. Enums, so that a misspelt kind in a method's
per-kind defaults is an error when the method registers, not a silently ignored key.

Both are `str` enums: a member equals its value (`TaskKind.TOKENS == "tokens"`), so the names stored in run.json
and printed by `ftctl list` are the plain words.
"""

from __future__ import annotations

from enum import Enum

# how a decoder language-model task computes its loss (launch/run/lm_loss.py)
LOSS_KERNELS = ("auto", "fused", "chunked", "plain")


class Family(str, Enum):
    """How a backbone reads and writes text."""

    ENCODER = "encoder"
    DECODER = "decoder"
    ENCODER_DECODER = "encoder-decoder"

    def __str__(self) -> str:
        return self.value


class TaskKind(str, Enum):
    """What methods tune their defaults by, and what the compatibility matrix keys on."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    TOKENS = "tokens"
    QA = "qa"
    GENERATION = "generation"

    def __str__(self) -> str:
        return self.value


FAMILIES: tuple[Family, ...] = tuple(Family)
