"""Masked language modelling with the BERT-style encoder."""

import torch

from ethos.models.config import ModelConfig
from ethos.models.encoder import Encoder
from ethos.optim import OptimConfig
from ethos.tasks.lm import LanguageModel


class MaskedLM(LanguageModel):
    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0):
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.model = Encoder(model, vocab_size, pad_id)
        if model.compile:
            self.model.trunk.compile()

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        # the head runs at the masked positions only: the data module's masking rate (BERT's 15%)
        rate = getattr(getattr(self._trainer, "datamodule", None), "mlm_probability", 0.15)
        return self.model.flops_per_token(seq_len=tokens_per_sample, batch_size=batch_size, mask_fraction=rate)

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, correct = self.model.mlm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            *self.documents(batch))
        return loss, correct, int((batch["labels"] != -100).sum())

    def target_bytes(self, batch: dict) -> torch.Tensor | None:
        """Bytes of the masked tokens (those the loss counts)."""
        if "bytes" not in batch:
            return None
        return batch["bytes"][batch["labels"] != -100].sum()
