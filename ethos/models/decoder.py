"""Causal decoder (GPT-style): token embedding, the shared pre-norm trunk run causally, the LM head."""

import torch.nn.functional as F
from torch import Tensor

from ethos.models.blocks import TextBackbone


class Decoder(TextBackbone):
    causal = True  # position t sees positions <= t only

    def flops_per_token(self, seq_len: int, batch_size: int) -> float:
        """Forward FLOPs per token position; the LM head runs at every position but the last of each
        row (counted as such even when some are padding: the closed form knows no data)."""
        return super().flops_per_token(seq_len, batch_size, (seq_len - 1) / seq_len)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.unembed(hidden)

    def clm_loss(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                 doc_ids: Tensor | None = None, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Next-token cross-entropy: position t predicts labels[t + 1]; -100 labels (padding, and with
        document masking the first token of each document) are ignored by position, whatever the pad id.
        Returns (mean loss, correct, counted tokens)."""
        hidden = self(input_ids, attention_mask, doc_ids, positions)[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        logits = self.logits(hidden[sel])  # only counted positions go through the vocabulary head
        target = target[sel]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).sum(), sel.sum()
