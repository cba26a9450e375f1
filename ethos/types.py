"""Constrained types for constructor signatures: the config check (ethos.config.validate) reads them.

A config value is checked against the annotation of the parameter it is passed to, before anything
is built or read, so `seq_len: PositiveInt` replaces a hand-written `if seq_len < 1: raise ...`.
Cross-field rules (n_heads divides d_model, ...) stay in the constructors.
"""

from typing import Annotated

from annotated_types import Ge, Gt, Le, Lt

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Probability = Annotated[float, Ge(0), Le(1)]  # closed [0, 1]
OpenUnit = Annotated[float, Gt(0), Lt(1)]  # open (0, 1)
HalfOpenUnit = Annotated[float, Ge(0), Lt(1)]  # [0, 1)

__all__ = ["PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "Probability", "OpenUnit",
           "HalfOpenUnit", "Ge", "Gt", "Le", "Lt"]
