"""What every task shares: AdamW with one weight-decay rule, warm-up + decay schedule, counts."""

import math
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


class Task(L.LightningModule):
    """Subclasses build `self.model` in __init__ and implement the steps."""

    def __init__(self, optim: OptimConfig):
        super().__init__()
        self.optim = optim
        self.val_history: list[tuple[int, float]] = []  # (step, val/loss); kept in checkpoints
        self.recipe: dict | None = None  # what rebuilds this task without Hydra (ethos.pretrained.load_task)

    def record_val(self, loss) -> None:
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(loss)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_history"] = list(self.val_history)
        if self.recipe:  # self-describing: the analysis tools and fine-tunes rebuild the model from this alone
            checkpoint["ethos"] = self.recipe

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = [tuple(v) for v in checkpoint.get("val_history", [])]

    def adopt_backbone(self, pretrained: str | None, freeze: bool, new: tuple[str, ...] = ()) -> None:
        """Fine-tuning: `self.model` starts from the pretrained run's weights, but for those under the `new`
        prefixes (a fresh head); `freeze` (a linear probe) trains only those, the rest kept in eval mode."""
        if pretrained:
            from ethos.pretrained import load_backbone

            self.pretrained_from = load_backbone(self.model, pretrained, new)
        self.probe = freeze
        if freeze:
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith(new) if new else False)

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # trainer=fsdp (ethos.parallel.FSDP): every process on the data axis
            from ethos.parallel import shard

            shard(self.model, self.device_mesh["data_parallel"])

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
        if getattr(self, "probe", False):  # a probe reads fixed features: no dropout in the frozen backbone
            self.model.eval()
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

    def on_train_start(self) -> None:
        # after a resume the scheduler holds the checkpoint's schedule: re-target it to this run's length
        for config in self.trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(fn, LRSchedule):
                    fn.extend(self.global_step, max(1, self.trainer.max_steps))

    def effective_batch_size(self) -> int | None:
        """Samples per optimizer step: micro-batch x gradient accumulation x world size."""
        micro = getattr(self.trainer.datamodule, "batch_size", None)
        return None if micro is None else micro * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_fit_start(self) -> None:
        counts = self.param_counts()
        batch = self.effective_batch_size()
        for logger in self.loggers:
            logger.log_hyperparams(counts)
            if batch is not None:  # a hyperparameter, and a metric so that it shows beside the curves
                logger.log_hyperparams({"trainer/effective_batch_size": batch})
                logger.log_metrics({"trainer/effective_batch_size": batch}, step=self.global_step)
        self.print("  ".join(f"{k.split('/')[-1]}: {v / 1e6:.2f}M" for k, v in counts.items() if "layer" not in k)
                   + ("" if batch is None else f"  effective batch: {batch}"))
