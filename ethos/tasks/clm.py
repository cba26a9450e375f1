"""Causal language modelling with the decoder: next-token loss, perplexity and accuracy."""

import torch
from torchmetrics import MeanMetric

from ethos.models.config import ModelConfig
from ethos.models.decoder import Decoder
from ethos.tasks.base import OptimConfig, Task


class CausalLM(Task):
    objective = "clm"  # the text data module reads this to build unmasked batches (CLMCollator)

    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0):
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.model = Decoder(model, vocab_size, pad_id)
        if model.compile:
            self.model.trunk.compile()
        # token-weighted means: the epoch value is the per-token loss over the whole split
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.val_history: list[tuple[int, float]] = []  # (step, val/loss) for cli's end-of-run summary

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, correct, n = self.model.clm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, correct, int(n)

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
