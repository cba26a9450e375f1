"""Pre-norm Transformer block and trunk shared by every backbone (encoder, decoder, ViT)."""

import math

import torch
from torch import Tensor, nn

from ethos.models.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    # RMSNorm is the default; LayerNorm matches timm's ViT and BERT exactly (and on CPU its fused
    # backward is ~8x faster than RMSNorm's decomposed one in torch 2.14)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        dense = layer_idx < cfg.num_dense_layers
        attn = (cfg.dense_attn or cfg.attn) if dense else cfg.attn
        ffn = (cfg.dense_ffn or cfg.ffn) if dense else cfg.ffn
        self.attn_norm = make_norm(cfg)
        self.attn = attn(**cfg.common())
        self.ffn_norm = make_norm(cfg)
        self.ffn = ffn(d_model=cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.drop(self.ffn(self.ffn_norm(x), pad_mask=attn_mask))


class Trunk(nn.Module):
    """The stack of blocks plus the final norm; embeddings and heads belong to the backbone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        for block in self.blocks:
            mark_residual_outputs(block)
            for m in (block.attn, block.ffn):
                if not getattr(m, "custom_init", False):  # experts keep their own scheme
                    m.apply(lambda mod: init_linear(mod, cfg.n_layers))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(x)


def init_linear(m: nn.Module, n_layers: int) -> None:
    # GPT-2 style: N(0, 0.02); projections that write into the residual stream are scaled down by
    # sqrt(2 * n_layers) so that the residual variance does not grow with depth
    if isinstance(m, nn.Linear):
        std = 0.02 / math.sqrt(2 * n_layers) if getattr(m, "residual_out", False) else 0.02
        nn.init.normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module, embedding_names: tuple[str, ...] = ("embed", "pos_embed")) -> dict[str, int]:
    """Total, non-embedding and attention parameter counts (tied weights counted once)."""
    seen, total, emb, attn = set(), 0, 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        parts = name.split(".")
        if any(part in embedding_names for part in parts):
            emb += p.numel()
        if "attn" in parts:
            attn += p.numel()
    return {"params/total": total, "params/non_embedding": total - emb, "params/attention": attn}


def mark_residual_outputs(module: nn.Module) -> None:
    """Tag the projections that write into the residual stream (for init_linear's depth scaling)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] in ("out", "w2", "o_b", "wo_b"):
            m.residual_out = True



class TextBackbone(nn.Module):
    """Token embedding (+ optional learned positions) and the trunk; the encoder and the decoder
    differ only in `causal` and their heads."""

    causal = False

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
        """Hidden states (B, T, d) after the final norm."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # packed blocks have no padding: keep SDPA's fastest path
        return self.trunk(x, attn_mask=attention_mask, is_causal=self.causal)
