"""Augmentation for the image pipeline: seeding it, timm's posterize made safe for Pillow >= 13, and the
batch collation that applies Mixup/CutMix.

Augmentation is seeded per item from (seed, micro-batch id, index), and mixup per micro-batch, so a
resumed run sees exactly the images an uninterrupted one would (the loader uses the same
StepBatchSampler as text). The index of a sample identifies its position in the global batch (no
sample repeats within one), so augmentation also differs across ranks and does not depend on the
world size. Mixup cannot: timm pairs the images of one micro-batch (the batch and its flip), so a
process's pairs depend on its micro-batch; it is seeded by (micro-batch id, this rank's first
position), so ranks draw different mixing factors.
"""

import random
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

Interpolation = Literal["bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"]  # timm's


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash() of str)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


@contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch (what timm's transforms and Mixup draw from), then restore them:
    with num_workers=0 this runs in the training process and must not disturb its RNG streams."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # the CPU generator only: torch.manual_seed also queues a lazy CUDA seed, which records a stack
    # trace per call (half of this loader's time per image); transforms draw from the CPU one
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment asks for 0 bits at high magnitudes ('Posterize', 'PosterizeIncreasing'):
    Pillow >= 13 raises on that, so one image in a few hundred would crash the loader. 0 bits kept
    is a black image, which is what older Pillow returned."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    # timm takes about a second to import: only when transforms are made
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


class Collate:
    """Stack a batch; train: optional timm Mixup/CutMix seeded by the micro-batch id; eval: drop
    replaced items. `skipped` = unreadable files met while building this batch."""

    def __init__(self, train: bool, mixup=None, seed: int = 0):
        self.train, self.mixup, self.seed = train, mixup, seed

    def __call__(self, items: list[dict]) -> dict:
        skipped = sum(1 for it in items if it["skipped"])
        if not self.train:
            items = [it for it in items if not it["skipped"]]
        if not items:
            return {"image": torch.zeros(0), "label": torch.zeros(0, dtype=torch.long), "skipped": skipped}
        x = torch.stack([it["image"] for it in items])
        y = torch.tensor([it["label"] for it in items], dtype=torch.long)
        out = {"image": x, "label": y, "skipped": skipped}
        if self.train and self.mixup is not None:
            first = max(0, items[0].get("batch_pos", 0))  # this rank's first position in the global batch
            with seeded(mix_seed(self.seed, items[0]["batch_idx"], 1 << 32, first)):
                out["image"], out["target"] = self.mixup(x, y)
        return out
