"""The optimizer config and the learning-rate schedule, one for every task and variant: AdamW with one
weight-decay rule (`decays`), linear warm-up, then linear / cosine decay or constant, extendable on resume."""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ethos.types import HalfOpenUnit, NonNegativeFloat, OpenUnit, PositiveFloat

# weight-decayed parameters: the weights of these module types, plus what a module lists in `projections`
PROJECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class OptimConfig:
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[OpenUnit, OpenUnit] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup: NonNegativeFloat = 0.1  # < 1: fraction of max_steps; >= 1: steps
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: HalfOpenUnit = 0.0  # the decay ends at lr * min_lr_ratio
    fused: bool | None = None  # None = fused AdamW on CUDA unless gradients are clipped under AMP

    def __post_init__(self):
        self.betas = tuple(self.betas)


def decays(module: nn.Module, name: str) -> bool:
    """The weight-decay rule, one for every task and variant: decay every projection matrix (Linear
    and conv weights, and the matrices a module lists in `projections`, e.g. the latent-expert
    generator); nothing else: no norms, biases, embeddings (tokens, positions, cls token), expert keys
    or expert tables. Tables are looked up, not multiplied: decay would only shrink rarely-used rows."""
    if isinstance(module, PROJECTIONS):
        return name == "weight"
    return name in getattr(module, "projections", ())


def clips_under_amp(trainer) -> bool:
    """Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it unscales
    them inside its step), so the default on CUDA falls back to the foreach AdamW when clipping."""
    return bool(getattr(trainer, "gradient_clip_val", None)) and "mixed" in str(getattr(trainer, "precision", ""))


class LRSchedule:
    """lr / peak at a step: linear warm-up from 0, then linear or cosine decay to `min_ratio` at `total`,
    or constant. The values of transformers' `polynomial` (power 1), `cosine_with_min_lr` and
    `constant_with_warmup` schedules (tested value by value), plus one thing they lack: `extend`.

    An object, not a function: LambdaLR saves a callable object's attributes with its state, so the
    checkpoint holds where the decay started and what it aims at.
    """

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float = 0.0):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio
        self.start, self.start_factor = warmup, 1.0  # the decay runs from (start, start_factor) to total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (step - self.start) / max(1, self.total - self.start))
        shape = 1 - p if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * p))
        return self.min_ratio + (self.start_factor - self.min_ratio) * shape

    def extend(self, step: int, total: int) -> None:
        """A resumed run with another max_steps: from the factor reached at `step`, the same decay runs to
        the floor at the new `total`; the LR does not jump (it was at the floor if the run had finished)."""
        if total == self.total:
            return
        if step > self.start:
            self.start, self.start_factor = step, self(step)
        self.total = total


def schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(o.schedule, warmup, total, o.min_lr_ratio))
