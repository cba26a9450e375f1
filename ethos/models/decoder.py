"""Causal decoder (GPT-style): token embedding, the shared pre-norm trunk run causally, tied LM head."""

import torch.nn.functional as F
from torch import Tensor

from ethos.models.blocks import TextBackbone


class Decoder(TextBackbone):
    causal = True  # position t sees positions <= t only

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed.weight)  # tied to the input embedding

    def clm_loss(self, input_ids: Tensor, attention_mask: Tensor | None,
                 labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Next-token cross-entropy: position t predicts labels[t + 1]; -100 labels (padding) are
        ignored by position, whatever the pad id. Returns (mean loss, correct, counted tokens)."""
        hidden = self(input_ids, attention_mask)[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        logits = self.logits(hidden[sel])  # only counted positions go through the vocabulary head
        target = target[sel]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).sum(), sel.sum()
