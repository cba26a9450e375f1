"""Samples/s and tokens/s over a sliding window of steps, and MFU when the device peak is known."""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


class Throughput(L.Callback):
    def __init__(self, window: int = 20):
        self.window = window
        self._t: list[float] = []
        self._samples: list[int] = []
        self._tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._t:
            self._sync(pl_module)
            self._t.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        samples, tokens = batch_size_and_tokens(batch, pl_module)
        self._samples.append(samples)
        self._tokens.append(tokens)
        self._sync(pl_module)
        self._t.append(time.perf_counter())
        if len(self._t) > self.window + 1:
            self._t.pop(0), self._samples.pop(0), self._tokens.pop(0)
        if trainer.global_step % trainer.log_every_n_steps or len(self._t) < 3:
            return
        dt = self._t[-1] - self._t[0]
        world = trainer.world_size
        metrics = {"perf/samples_per_sec": sum(self._samples) * world / dt,
                   "perf/tokens_per_sec": sum(self._tokens) * world / dt}
        flops_per_token = getattr(pl_module, "flops_per_token", None)
        peak = self._peak(trainer, pl_module)
        if flops_per_token and peak:
            metrics["perf/mfu"] = metrics["perf/tokens_per_sec"] * flops_per_token / (peak * world)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @staticmethod
    def _peak(trainer, pl_module) -> float | None:
        if pl_module.device.type != "cuda":
            return None  # CPU peaks are not known reliably
        return get_available_flops(pl_module.device, trainer.precision)


def batch_size_and_tokens(batch, pl_module) -> tuple[int, int]:
    """Text batches count token positions; image batches count patches (the ViT's tokens)."""
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        return ids.shape[0], ids.numel()
    images = batch["image"] if isinstance(batch, dict) else batch[0]
    patch_embed = getattr(getattr(pl_module, "model", None), "patch_embed", None)
    per_image = getattr(patch_embed, "num_patches", 1) or 1
    return images.shape[0], images.shape[0] * per_image
