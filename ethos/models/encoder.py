"""BERT-style encoder for masked LM: embeddings, pre-norm trunk, MLM head tied to the embeddings."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.models.blocks import Trunk
from ethos.models.config import ModelConfig


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos else None
        self.trunk = Trunk(cfg)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, d) after the final norm."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # packed blocks have no padding: keep SDPA's fastest path
        return self.trunk(x, attn_mask=attention_mask)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed.weight, self.mlm_bias)

    def mlm_loss(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy over masked positions only; returns (loss, number of correct predictions).

        Only the ~15% masked positions go through the vocabulary projection: the head is most of an
        MLM step's cost at BERT vocabulary sizes.
        """
        hidden = self(input_ids, attention_mask)
        sel = labels != -100
        logits = self.mlm_logits(hidden[sel])
        target = labels[sel]
        loss = F.cross_entropy(logits.float(), target)
        correct = (logits.argmax(-1) == target).sum()
        return loss, correct
