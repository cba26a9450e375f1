"""What masked and causal language modelling share: per-token metrics and their logging."""

import torch
from torchmetrics import MeanMetric

from ethos.optim import OptimConfig
from ethos.tasks.base import Task


class LanguageModel(Task):
    """Subclasses build `self.model` and implement `_step(batch) -> (loss, n_correct, n_targets)`."""

    def __init__(self, optim: OptimConfig):
        super().__init__(optim)
        # token-weighted means: the epoch value is the per-token loss over the whole split
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def batch_dims(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["input_ids"].shape)  # every position counts, padding included

    def nominal_batch_dims(self) -> tuple[int, int] | None:
        dm = getattr(self._trainer, "datamodule", None)
        if getattr(dm, "batch_size", None) and getattr(dm, "seq_len", None):
            return dm.batch_size, dm.seq_len
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, correct, n = self._step(batch)
        world = self.trainer.world_size
        if world > 1:
            # Ranks count different numbers of targets (MLM masks ~15% per row, padding varies) and DDP
            # averages gradients: weight this rank's mean by its share of the global count, so the step is the
            # global batch's per-token mean, as one process with the whole batch takes it. One 3-float all-reduce.
            stats = torch.stack([loss.detach() * n, correct.float(), loss.new_tensor(float(n))])
            total_loss, correct, total = self.trainer.strategy.reduce(stats, reduce_op="sum")
            logged, acc = total_loss / total.clamp(min=1), correct / total.clamp(min=1)
            loss = loss * (n * world / total.clamp(min=1))
        else:
            logged, acc = loss.detach(), correct / max(n, 1)
        self.log_dict({"train/loss": logged, "train/acc": acc, "train/ppl": torch.exp(logged.clamp(max=30))},
                      prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, correct, n = self._step(batch)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(correct / max(n, 1), weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.record_val(loss)
        self.log_dict({"val/loss": loss, "val/acc": self.val_acc.compute(),
                       "val/ppl": torch.exp(loss.clamp(max=30))}, prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
