"""Masked language modelling with the BERT-style encoder."""

import torch
from torchmetrics import MeanMetric

from ethos.models.config import ModelConfig
from ethos.models.encoder import Encoder
from ethos.tasks.base import OptimConfig, Task


class MaskedLM(Task):
    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0):
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.model = Encoder(model, vocab_size, pad_id)
        if model.compile:
            self.model.trunk.compile()
        # token-weighted means: the epoch value is the per-masked-token loss over the whole split
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.val_history: list[tuple[int, float]] = []  # (step, val/loss) for the end-of-run summary

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, correct = self.model.mlm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, correct, int((batch["labels"] != -100).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, correct, n = self._step(batch)
        self.log_dict({"train/loss": loss, "train/acc": correct / max(n, 1),
                       "train/ppl": torch.exp(loss.detach().clamp(max=30))}, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, correct, n = self._step(batch)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(correct / max(n, 1), weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(loss)))
        self.log_dict({"val/loss": loss, "val/acc": self.val_acc.compute(),
                       "val/ppl": torch.exp(loss.clamp(max=30))}, prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
