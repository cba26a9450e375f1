"""Encoder–decoder (T5-style, docs/design.md §12): our bidirectional trunk encodes the prompt, a causal trunk whose
blocks add cross-attention decodes. Self-attention in both is any `model.attn` variant and score function;
cross-attention is MHA or GQA (`cross_kv_heads`) with the same score function.

Cross-attention has no RoPE: queries and keys come from different sequences, so their distance means nothing
(T5 and BART put no positions in it either). It is not MLA: MLA's gain is a small KV cache for a context that
grows token by token, while the encoder's keys and values are computed once per prompt and cached as they are;
its decoupled RoPE channels have nothing to rotate here. GQA covers the cache question for cross-attention.

The input embedding is shared by both trunks and tied to the vocabulary head unless model.tie_embeddings=false
(T5). `encoder_layers` and `decoder_layers` default to model.n_layers each; `param_count` and `flops_per_token`
are closed forms, so a study can match the model to a decoder at equal parameters or equal FLOPs.
"""

import functools
from dataclasses import replace

import torch
from torch import Tensor, nn

from ethos.models.attention import kv_heads
from ethos.models.blocks import Block, TextBackbone, Trunk, closed_form, layer_factories, make_norm
from ethos.models.config import ModelConfig
from ethos.models.scores import Attend, Docs, docs_mask


class CrossAttention(nn.Module):
    """q from the decoder stream x, k and v from the encoder's output `memory`; `allowed` (B, 1, Tq, Tk) says which
    encoder tokens each decoder token reads. A query with no allowed key (a document with an empty prompt) gets
    zero output, whatever the score function."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None,
                 score: str = "softmax", gate: str = "none", sigmoid_bias: float | None = None, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        self.n_kv_heads = kv_heads(n_heads, n_kv_heads)
        inner, kv = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.kv = nn.Linear(d_model, 2 * kv, bias=bias)  # rows laid out [W_k; W_v]
        self.attend = Attend(d_model, n_heads, self.head_dim, score, gate, sigmoid_bias, bias)
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout

    @staticmethod
    def param_count(d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None,
                    score: str = "softmax", gate: str = "none", bias: bool = False, **_) -> int:
        d_h = head_dim or d_model // n_heads
        inner, kv = n_heads * d_h, (n_kv_heads or n_heads) * d_h
        return (2 * d_model * inner + 2 * d_model * kv + bias * (inner + 2 * kv + d_model)
                + Attend.param_count(d_model, n_heads, d_h, score, gate, bias))

    @staticmethod
    def flops(d_model: int, n_heads: int, head_dim: int | None = None, *, memory_len: int, score: str = "softmax",
              gate: str = "none", **_) -> int:
        """Forward FLOPs per decoder token: W_q, W_O, q k^T and p v over memory_len keys, the gate."""
        d_h = head_dim or d_model // n_heads
        inner = n_heads * d_h
        return 2 * 2 * d_model * inner + 2 * 2 * memory_len * inner + Attend.flops(d_model, n_heads, d_h, d_h,
                                                                                    score, gate)

    @staticmethod
    def memory_flops(d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None,
                     **_) -> int:
        """Forward FLOPs per encoder token: W_k and W_v."""
        return 2 * 2 * d_model * (n_kv_heads or n_heads) * (head_dim or d_model // n_heads)

    def forward(self, x: Tensor, memory: Tensor, allowed: Tensor) -> Tensor:
        B, Tq, _ = x.shape
        q = self.q(x).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, memory.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)
                for t in self.kv(memory).chunk(2, -1))
        some = allowed.any(-1, keepdim=True)  # (B, 1, Tq, 1): an empty row would be NaN under softmax
        o = self.attend(x, q, k, v, dropout_p=self.dropout, docs=Docs(None, allowed=allowed | ~some))
        return self.out(o * some[:, 0].to(o.dtype))


class CrossBlock(Block):
    """Pre-norm decoder block of an encoder–decoder: causal self-attention, cross-attention, FFN."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross_kv_heads: int | None = None):
        super().__init__(cfg, layer_idx)
        self.cross_norm = make_norm(cfg)
        self.cross = CrossAttention(**cross_args(cfg, layer_idx, cross_kv_heads))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, rope=None,
                docs: Docs | None = None, memory: Tensor | None = None, cross: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope, docs=docs))
        x = x + self.drop(self.cross(self.cross_norm(x), memory, cross))
        return x + self.drop(self.ffn(self.ffn_norm(x), pad_mask=attn_mask))


def cross_args(cfg: ModelConfig, layer_idx: int, cross_kv_heads: int | None) -> dict:
    """The cross-attention's arguments: the layer's self-attention score function and gate, MHA or GQA heads."""
    attn = layer_factories(cfg, layer_idx)[0]
    kw = getattr(attn, "keywords", {})
    return dict(d_model=cfg.d_model, n_heads=cfg.n_heads, head_dim=cfg.head_dim, n_kv_heads=cross_kv_heads,
                score=kw.get("score", "softmax"), gate=kw.get("gate", "none"), sigmoid_bias=kw.get("sigmoid_bias"),
                dropout=cfg.dropout, bias=kw.get("bias", False))


def norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def block_params(cfg: ModelConfig, layer_idx: int) -> int:
    """A Block's parameters in closed form: attention, FFN (their `param_count`), two norms."""
    attn, ffn = layer_factories(cfg, layer_idx)
    return (closed_form(attn, "param_count", **cfg.common()) + closed_form(ffn, "param_count", d_model=cfg.d_model)
            + 2 * norm_params(cfg))


class EncoderDecoder(TextBackbone):
    causal = True  # the decoder trunk (self.trunk); the encoder (self.encoder) is bidirectional

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0, encoder_layers: int | None = None,
                 decoder_layers: int | None = None, cross_kv_heads: int | None = None):
        self.enc_cfg = replace(cfg, n_layers=encoder_layers or cfg.n_layers)
        self.dec_cfg = replace(cfg, n_layers=decoder_layers or cfg.n_layers)
        self.cross_kv_heads = cross_kv_heads
        super().__init__(cfg, vocab_size, pad_id)
        self.encoder = Trunk(self.enc_cfg)

    def build_trunk(self, cfg: ModelConfig) -> Trunk:
        return Trunk(self.dec_cfg, block=functools.partial(CrossBlock, cross_kv_heads=self.cross_kv_heads))

    @staticmethod
    def param_count(cfg: ModelConfig, vocab_size: int, encoder_layers: int | None = None,
                    decoder_layers: int | None = None, cross_kv_heads: int | None = None) -> int:
        enc, dec = encoder_layers or cfg.n_layers, decoder_layers or cfg.n_layers
        cross = sum(CrossAttention.param_count(**cross_args(cfg, i, cross_kv_heads)) + norm_params(cfg)
                    for i in range(dec))
        blocks = sum(block_params(cfg, i) for i in range(enc)) + sum(block_params(cfg, i) for i in range(dec))
        vocab = vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        pos = cfg.max_seq_len * cfg.d_model if cfg.learned_pos else 0
        return blocks + cross + 2 * norm_params(cfg) + vocab + pos

    def flops_per_token(self, seq_len: int, batch_size: int) -> float:
        """Forward FLOPs per position of a sample laid out as an encoder row and a decoder row of seq_len each
        (the collator's layout): both trunks, cross-attention over seq_len keys, W_k / W_v on every encoder
        token, the vocabulary head on every decoder position but the last."""
        V, d = self.embed.weight.shape
        tokens = seq_len * batch_size
        cross = sum(CrossAttention.flops(**cross_args(self.dec_cfg, i, self.cross_kv_heads), memory_len=seq_len)
                    + CrossAttention.memory_flops(**cross_args(self.dec_cfg, i, self.cross_kv_heads))
                    for i in range(self.dec_cfg.n_layers))
        return (Trunk.flops(self.enc_cfg, seq_len, tokens) + Trunk.flops(self.dec_cfg, seq_len, tokens) + cross
                + (seq_len - 1) / seq_len * 2 * d * V)

    def encode(self, ids: Tensor, attention_mask: Tensor | None = None, doc_ids: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
        """The encoder's output (B, Te, d), bidirectional within each document."""
        docs = None if doc_ids is None else docs_mask(doc_ids, attention_mask, False)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return self.encoder(self.embed_tokens(ids, positions), attn_mask=attention_mask, positions=positions,
                            docs=docs)

    def decode(self, ids: Tensor, memory: Tensor, cross: Tensor, attention_mask: Tensor | None = None,
               doc_ids: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """The decoder's hidden states (B, Td, d): causal within each document, reading `memory` where `cross`
        (B, 1, Td, Te) allows (`cross_mask`)."""
        return self(ids, attention_mask, doc_ids, positions, memory=memory, cross=cross)

    def generate(self, enc_ids: Tensor, enc_mask: Tensor, start_id: int, max_new_tokens: int,
                 eos_id: int | None = None) -> Tensor:
        """Greedy decoding of one document per row (B, <= max_new_tokens); a row that has produced eos_id keeps
        producing it. No KV cache: for evaluation and tests, not serving."""
        memory = self.encode(enc_ids, enc_mask)
        out = enc_ids.new_full((enc_ids.shape[0], 1), start_id)
        done = torch.zeros(enc_ids.shape[0], dtype=torch.bool, device=enc_ids.device)
        for _ in range(max_new_tokens):
            cross = enc_mask.bool()[:, None, None, :].expand(-1, 1, out.shape[1], -1)
            nxt = self.logits(self.decode(out, memory, cross)[:, -1]).argmax(-1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), 1)
            if eos_id is not None and bool(done.all()):
                break
        return out[:, 1:]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.unembed(hidden)


def cross_mask(dec_doc_ids: Tensor, enc_doc_ids: Tensor, enc_mask: Tensor, by_document: bool = True) -> Tensor:
    """(B, 1, Td, Te): a decoder token reads the real encoder tokens of its own document (`by_document`), or of
    its whole row."""
    real = enc_mask.bool()[:, None, None, :]
    if not by_document:
        return real.expand(-1, 1, dec_doc_ids.shape[1], -1)
    same = dec_doc_ids[:, None, :, None] == enc_doc_ids[:, None, None, :]
    return same & real & (dec_doc_ids > 0)[:, None, :, None]
