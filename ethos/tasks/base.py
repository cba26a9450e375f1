"""What every task shares: AdamW with one weight-decay rule, warm-up + decay schedule, counts."""

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import nn

from ethos.models.blocks import count_params
from ethos.models.flops import TRAIN_FACTOR
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


def schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, total: int):
    """Warm-up then linear / cosine decay to lr * min_lr_ratio, or constant: transformers' schedulers."""
    from transformers import get_scheduler

    warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    name, kwargs = {
        "linear": ("polynomial", {"lr_end": o.lr * o.min_lr_ratio, "power": 1.0}),  # power 1 = linear
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": o.min_lr_ratio}),
        "constant": ("constant_with_warmup", {}),
    }[o.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=kwargs)


class Task(L.LightningModule):
    """Subclasses build `self.model` in __init__ and implement the steps."""

    def __init__(self, optim: OptimConfig):
        super().__init__()
        self.optim = optim
        self.val_history: list[tuple[int, float]] = []  # (step, val/loss); kept in checkpoints

    def record_val(self, loss) -> None:
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(loss)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_history"] = list(self.val_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = [tuple(v) for v in checkpoint.get("val_history", [])]

    def param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    (decay if decays(module, name) else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        o = self.optim
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" and not clips_under_amp(self.trainer))
        opt = torch.optim.AdamW(self.param_groups(), lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)
        total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0
                    else self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule(opt, o, total), "interval": "step"}}

    # FLOPs in closed form (ethos/models/flops.py), for the Throughput callback and the model summary
    def batch_dims(self, batch) -> tuple[int, int]:
        """(samples, tokens per sample) of a batch, as throughput counts them."""
        raise NotImplementedError

    def nominal_batch_dims(self) -> tuple[int, int] | None:
        """batch_dims of a training batch before any is seen (from the data module), or None."""
        return None

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        """Forward FLOPs per token of a batch of that shape (closed form, from the model config)."""
        raise NotImplementedError

    def step_flops(self, batch_size: int, tokens_per_sample: int, training: bool = True) -> float:
        """FLOPs of one step on a batch of that shape: forward, x3 with the backward when training."""
        per_token = self.flops_per_token(batch_size, tokens_per_sample)
        return (TRAIN_FACTOR if training else 1) * per_token * batch_size * tokens_per_sample

    @property
    def flops_per_batch(self) -> float | None:
        """FLOPs of the current batch, read by Lightning's ThroughputMonitor (perf/flops_per_sec, perf/mfu).
        A property, not a plain attribute: the monitor checks once, at its first batch (maybe a
        validation one before training), whether the module has it at all."""
        return getattr(self, "_batch_flops", None)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_flops = self.step_flops(*self.batch_dims(batch))

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.step_flops(*self.batch_dims(batch), training=False)

    def param_counts(self) -> dict[str, int]:
        counts = count_params(self.model)
        for i, block in enumerate(self.model.trunk.blocks):  # per layer: dense and expert layers differ
            layer = count_params(block)
            counts[f"params/layer{i}/total"] = layer["params/total"]
            counts[f"params/layer{i}/attention"] = layer["params/attention"]
        return counts

    def on_fit_start(self) -> None:
        counts = self.param_counts()
        for logger in self.loggers:
            logger.log_hyperparams(counts)
        self.print("  ".join(f"{k.split('/')[-1]}: {v / 1e6:.2f}M" for k, v in counts.items() if "layer" not in k))
