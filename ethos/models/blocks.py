"""Pre-norm Transformer block and trunk shared by every backbone (encoder, decoder, ViT)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.models.config import ModelConfig
from ethos.models.rope import Rope, Rotary
from ethos.models.scores import Docs, docs_mask


def make_norm(cfg: ModelConfig) -> nn.Module:
    # RMSNorm is the default; LayerNorm matches timm's ViT and BERT exactly (and on CPU its fused
    # backward is ~8x faster than RMSNorm's decomposed one in torch 2.14)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def layer_factories(cfg: ModelConfig, layer_idx: int) -> tuple:
    """(attention, FFN) factories of a layer: the first num_dense_layers may use dense ones."""
    if layer_idx < cfg.num_dense_layers:
        return cfg.dense_attn or cfg.attn, cfg.dense_ffn or cfg.ffn
    return cfg.attn, cfg.ffn


def closed_form(factory, name: str, **kwargs):
    """Call a module's static closed form (`param_count`, `flops`) with its config arguments: works for
    Hydra partials (class + keywords) and bare classes."""
    cls = getattr(factory, "func", factory)
    return getattr(cls, name)(**{**getattr(factory, "keywords", {}), **kwargs})


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        attn, ffn = layer_factories(cfg, layer_idx)
        self.attn_norm = make_norm(cfg)
        self.attn = attn(**cfg.common())
        self.ffn_norm = make_norm(cfg)
        self.ffn = ffn(d_model=cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    @staticmethod
    def flops(cfg: ModelConfig, layer_idx: int, seq_len: int, tokens: int) -> float:
        """Forward FLOPs per token (norms ignored) for sequences of seq_len, tokens per forward."""
        attn, ffn = layer_factories(cfg, layer_idx)
        return (closed_form(attn, "flops", **cfg.common(), seq_len=seq_len)
                + closed_form(ffn, "flops", d_model=cfg.d_model, tokens=tokens))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                rope: Rope | None = None, docs: Docs | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope, docs=docs))
        return x + self.drop(self.ffn(self.ffn_norm(x), pad_mask=attn_mask))


class Trunk(nn.Module):
    """The stack of blocks plus the final norm; embeddings and heads belong to the backbone.

    The trunk owns the model's one RoPE table: (cos, sin) for the current positions are cast to the
    activation dtype once per forward and shared by every layer's attention.
    """

    def __init__(self, cfg: ModelConfig, block=None):
        """`block`: a Block subclass (or a partial of one) for every layer, e.g. the encoder–decoder's
        CrossBlock (ethos/models/seq2seq.py); Block by default."""
        super().__init__()
        block = block or Block
        self.rope = Rotary(cfg.rope_dims, cfg.rope_theta, cfg.max_seq_len) if cfg.rope_dims else None
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        for block in self.blocks:
            mark_residual_outputs(block)
            for m in (block.attn, getattr(block, "cross", None), block.ffn):
                if m is not None and not getattr(m, "custom_init", False):  # experts keep their own scheme
                    m.apply(lambda mod: init_linear(mod, cfg.n_layers, cfg.zero_init))

    @staticmethod
    def flops(cfg: ModelConfig, seq_len: int, tokens: int) -> float:
        """Forward FLOPs per token of all blocks for sequences of seq_len, `tokens` tokens per forward."""
        return sum(Block.flops(cfg, i, seq_len, tokens) for i in range(cfg.n_layers))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                positions: Tensor | None = None, docs: Docs | None = None, **extra) -> Tensor:
        """`positions` (B, T) restart RoPE at every document; `docs` keeps attention within documents; `extra`
        goes to every block (the encoder's output for cross-attention)."""
        rope = None
        if self.rope is not None:
            # q and k come out of the attention projections: under autocast in its dtype, not x's
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            rope = self.rope(x.shape[1], dtype, positions)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope, docs=docs, **extra)
        return self.norm(x)


def init_linear(m: nn.Module, n_layers: int, zero_out: bool = False) -> None:
    # GPT-2 style: N(0, 0.02); projections that write into the residual stream are scaled down by
    # sqrt(2 * n_layers) so that the residual variance does not grow with depth. `zero_out` (model.zero_init,
    # modded-nanogpt / nanochat) starts them at zero instead: every block starts as the identity, and the
    # first step's gradient reaches those matrices only (the others get theirs from the second step on)
    if isinstance(m, nn.Linear):
        residual = getattr(m, "residual_out", False)
        if residual and zero_out:
            nn.init.zeros_(m.weight)
        else:
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * n_layers) if residual else 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif hasattr(m, "init_experts"):  # expert tables of their own (ethos.models.moe.MoE): the same scheme
        m.init_experts(n_layers, zero_out)


def count_params(model: nn.Module, embedding_names: tuple[str, ...] = ("embed", "pos_embed", "lm_head")
                 ) -> dict[str, int]:
    """Total, non-embedding, attention and active parameter counts (tied weights counted once; an untied
    vocabulary head counts as embedding, as Kaplan et al.'s non-embedding N excludes both vocabulary matrices).
    Active: what one token uses, the total less what each expert layer leaves unused (its `active_params()`)."""
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
    unused = sum(sum(p.numel() for p in m.parameters()) - m.active_params()
                 for m in model.modules() if hasattr(m, "active_params"))
    return {"params/total": total, "params/non_embedding": total - emb, "params/attention": attn,
            "params/active": total - unused}


def mark_residual_outputs(module: nn.Module) -> None:
    """Tag the projections that write into the residual stream (for init_linear's depth scaling)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] in ("out", "w2", "o_b", "wo_b"):
            m.residual_out = True



class TextBackbone(nn.Module):
    """Token embedding (+ optional learned positions), the trunk and the vocabulary head (tied to the embedding
    unless model.tie_embeddings=false); the encoder and the decoder differ only in `causal` and their heads."""

    causal = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        # no padding_idx: padding is masked out of attention and loss already, and when pad falls back
        # to EOS/SEP (GPT-2, packed BERT data) padding_idx would freeze that real token's embedding
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos else None
        self.trunk = self.build_trunk(cfg)  # ends in the final norm
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        if self.lm_head is not None and cfg.zero_init:  # modded-nanogpt: the first logits are uniform
            nn.init.zeros_(self.lm_head.weight)
        elif self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def build_trunk(self, cfg: ModelConfig) -> Trunk:
        return Trunk(cfg)

    def flops_per_token(self, seq_len: int, batch_size: int, head_fraction: float) -> float:
        """Forward FLOPs per token position: the trunk, plus the vocabulary head at the fraction of
        positions it runs on (embedding lookups and position adds are not FLOPs by our convention)."""
        V, d = self.embed.weight.shape
        return Trunk.flops(self.cfg, seq_len, seq_len * batch_size) + head_fraction * 2 * d * V

    def unembed(self, hidden: Tensor, bias: Tensor | None = None) -> Tensor:
        """Vocabulary logits; with model.logit_softcap c, c * tanh(logits / c) (Gemma 2): bounded logits."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight, bias)
        cap = self.cfg.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def embed_tokens(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Token embeddings, plus the learned positions (model.learned_pos) at `positions` or 0..T-1."""
        x = self.embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(ids.shape[1], device=ids.device) if positions is None else positions)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, doc_ids: Tensor | None = None,
                positions: Tensor | None = None, prefix: Tensor | None = None, **extra) -> Tensor:
        """Hidden states (B, T, d) after the final norm. `doc_ids` (B, T) (document masking, padding a document
        of its own) keep attention within each packed document; `positions` (B, T) restart at each one;
        `prefix` (B, T) span ids make each prefix bidirectional in a causal backbone (prefix-LM, `Docs`); `extra`
        goes to every block (ethos/models/seq2seq.py: the encoder's output and the cross-attention mask)."""
        x = self.embed_tokens(input_ids, positions)
        # built here, outside a compiled trunk: once per batch, shared by every layer
        if prefix is not None and doc_ids is None:  # no document masking: each row is one document
            doc_ids = attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids)
        docs = None if doc_ids is None else docs_mask(doc_ids, attention_mask, self.causal, prefix)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # packed blocks have no padding: keep SDPA's fastest path
        return self.trunk(x, attn_mask=attention_mask, is_causal=self.causal, positions=positions, docs=docs, **extra)
