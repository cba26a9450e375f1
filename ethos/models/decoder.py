"""Causal decoder (GPT-style): token embedding, the shared pre-norm trunk run causally, tied LM head."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.models.blocks import Trunk
from ethos.models.config import ModelConfig


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos else None
        self.trunk = Trunk(cfg)  # ends in the final norm
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, d) after the final norm; position t sees positions <= t only."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # packed blocks have no padding: keep SDPA's fast is_causal path
        return self.trunk(x, attn_mask=attention_mask, is_causal=True)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed.weight)  # tied to the input embedding

    def clm_loss(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Next-token cross-entropy: position t predicts labels[t + 1]; -100 labels (padding) are
        ignored by position, whatever the pad id. Returns (mean loss, correct, counted tokens)."""
        hidden = self(input_ids, attention_mask)[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        logits = self.logits(hidden[sel])  # only counted positions go through the vocabulary head
        target = target[sel]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).sum(), sel.sum()
