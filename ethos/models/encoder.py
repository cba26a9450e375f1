"""BERT-style encoder for masked LM: embeddings, pre-norm trunk, MLM head (tied to the embeddings by default)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.models.blocks import TextBackbone
from ethos.models.config import ModelConfig


class Encoder(TextBackbone):
    causal = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__(cfg, vocab_size, pad_id)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))

    def flops_per_token(self, seq_len: int, batch_size: int, mask_fraction: float = 0.15) -> float:
        """Forward FLOPs per token position; the MLM head runs only at the masked ones (`mask_fraction`)."""
        return super().flops_per_token(seq_len, batch_size, mask_fraction)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return self.unembed(hidden, self.mlm_bias)

    def mlm_loss(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                 doc_ids: Tensor | None = None, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cross-entropy over masked positions only; returns (loss, number of correct predictions).

        Only the ~15% masked positions go through the vocabulary projection: the head is most of an
        MLM step's cost at BERT vocabulary sizes.
        """
        hidden = self(input_ids, attention_mask, doc_ids, positions)
        sel = labels != -100
        logits = self.mlm_logits(hidden[sel])
        target = labels[sel]
        loss = F.cross_entropy(logits.float(), target)
        correct = (logits.argmax(-1) == target).sum()
        return loss, correct
