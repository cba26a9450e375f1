"""Causal language modelling with the decoder: next-token loss, perplexity and accuracy."""

import torch

from ethos.models.config import ModelConfig
from ethos.models.decoder import Decoder
from ethos.optim import OptimConfig
from ethos.tasks.lm import LanguageModel


class CausalLM(LanguageModel):
    objective = "clm"  # the text data module reads this to build unmasked batches (CLMCollator)

    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0):
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.model = Decoder(model, vocab_size, pad_id)
        if model.compile:
            self.model.trunk.compile()

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        return self.model.flops_per_token(seq_len=tokens_per_sample, batch_size=batch_size)

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, correct, n = self.model.clm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                               *self.documents(batch))
        return loss, correct, int(n)

    target_bytes = LanguageModel.next_token_bytes  # position t predicts token t + 1, as clm_loss counts them
