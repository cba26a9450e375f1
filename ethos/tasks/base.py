"""What every task shares: AdamW with decay only on matrices, warm-up + decay schedule, counts."""

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from ethos.errors import ConfigError
from ethos.models.blocks import count_params

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.1  # < 1: fraction of max_steps; >= 1: steps
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    fused: bool | None = None  # None = fused AdamW on CUDA

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: valid are {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")
        if self.warmup < 0:
            raise ConfigError(f"optim.warmup={self.warmup}: must be >= 0 (fraction < 1 or steps)")
        self.betas = tuple(self.betas)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


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
        # no weight decay on norms, biases and embeddings: decaying them hurts and buys nothing
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_emb = isinstance(module, nn.Embedding) or "embed" in module_name
                (no_decay if p.ndim < 2 or is_emb else decay).append(p)
        return [{"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        o = self.optim
        fused = o.fused if o.fused is not None else self.device.type == "cuda"
        opt = torch.optim.AdamW(self.param_groups(), lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)
        total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0
                    else self.trainer.estimated_stepping_batches)
        warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, total, warmup, o.schedule, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
