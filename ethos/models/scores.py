"""Attention score functions and the output gate, one implementation for MHA, MLA and MLA-o (docs/design.md §8).

Per head, s = q.k * scale over the keys a query may attend to (`allowed`: its row's real tokens, and for
causal attention those at or before it); p are the weights of the values, o = sum_j p_j v_j:

    softmax   p = exp(s) / sum exp(s)                                    (SDPA, unchanged)
    softmax1  p = exp(s) / (1 + sum exp(s))                              (off-by-one: may attend to nothing)
    sink      p = exp(s) / (exp(theta_h) + sum exp(s)), theta_h learned  (gpt-oss)
    sigmoid   p = sigmoid(s + b), b = -log(n) unless `sigmoid_bias` set  (Ramapuram et al. 2024)
    relu      p = relu(s) / n                                            (Wortsman et al. 2023)
    gate      o_h <- o_h * sigmoid(x W_g), per head (W_g: d -> H) or per channel (d -> H * d_v), before W_O
              (Qiu et al. 2025)

n is the number of keys the query may attend to: its row's real tokens, and for causal attention only
those up to it. For unpadded bidirectional attention that is the sequence length, the papers' n; counting
per query keeps the output of a row independent of the padding around it and a causal row independent
of the future (a sequence length would tell early positions how long their document is). A row with no
key gets n = 1, so sigmoid and relu give it zero output, not NaN.

Paths: softmax keeps its SDPA call. softmax1 and sink run exactly on SDPA with one prepended null key
(`null_key_sdpa`; with dropout on the weights, on the plain path). sigmoid and relu run on FlexAttention
where it trains on the device (`flex_usable`), else on the plain path (`plain`), which also serves
`record_attention`: only then are probabilities materialised, so training speed is untouched.
"""

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.errors import ConfigError

Score = Literal["softmax", "softmax1", "sink", "sigmoid", "relu"]
Gate = Literal["none", "head", "elementwise"]
NULL_KEY = ("softmax1", "sink")  # scores with a slot for "nothing"


class Docs(NamedTuple):
    """Packed documents (document masking, docs/design.md §10.1): built once per batch by the backbone
    (`docs_mask`) and shared by every layer. A token attends only to tokens of its own document.

    `ids` (B, T) give each token's document; padding must be a document of its own (the collators give it
    id 0), so a real token never sees padding and a padding row still sees itself (no empty softmax row).
    `allowed` is the dense (B, 1, T, T) mask of the SDPA and plain paths; `block` FlexAttention's block mask
    where FlexAttention trains (CUDA), else None. `prefix` (B, T), for prefix-LM attention (docs/design.md §12):
    the id of the prefix span a token belongs to, 0 outside any; tokens of one span also see each other
    bidirectionally (every other pair keeps the causal rule)."""

    ids: Tensor
    allowed: Tensor | None = None
    block: object | None = None
    prefix: Tensor | None = None


def allowed_keys(attn_mask: Tensor | None, is_causal: bool, T: int, device,
                 doc_ids: Tensor | None = None, prefix: Tensor | None = None) -> Tensor | None:
    """(B|1, 1, T|1, T) bool, True where query t may attend to key j; None when every key is allowed.
    With `doc_ids`, only keys of the query's own document (and, as a guard for callers that give padding
    a real document's id, no padding key for a real query). With `prefix` (`Docs.prefix`; causal only), a
    query in a prefix span also sees the span's later tokens: same_doc & (j <= t | same prefix span)."""
    mask = attn_mask[:, None, None, :].bool() if attn_mask is not None else None
    if doc_ids is not None:
        same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        if mask is not None:
            same = same & (mask | ~attn_mask[:, None, :, None].bool())
        mask = same
    if is_causal:
        tril = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if prefix is not None:  # then still within the document and off padding (the mask above)
            tril = tril | prefix_pairs(prefix)
        mask = tril if mask is None else mask & tril
    return mask


def prefix_pairs(prefix: Tensor) -> Tensor:
    """(B, 1, T, T): True where query and key lie in the same prefix span (id > 0)."""
    return (prefix[:, None, :, None] == prefix[:, None, None, :]) & (prefix[:, None, :, None] > 0)


def docs_mask(doc_ids: Tensor, attn_mask: Tensor | None, is_causal: bool, prefix: Tensor | None = None) -> Docs:
    """The batch's document mask (with `prefix`, prefix-LM attention), built once: a FlexAttention block mask
    where FlexAttention trains, else the dense mask of SDPA and the plain path."""
    B, T = doc_ids.shape
    if prefix is not None and not is_causal:
        raise ValueError("a prefix only changes causal attention (bidirectional attention sees every span)")
    if flex_usable(doc_ids.device.type):
        return Docs(doc_ids, block=flex_block_mask(attn_mask, is_causal, doc_ids, B, T, doc_ids.device, prefix),
                    prefix=prefix)
    return Docs(doc_ids, allowed=allowed_keys(attn_mask, is_causal, T, doc_ids.device, doc_ids, prefix),
                prefix=prefix)


def sdpa_mask(attn_mask: Tensor | None, is_causal: bool, T: int, device) -> tuple[Tensor | None, bool]:
    """Turn a (B, T) padding mask into what SDPA wants; keeps the fast is_causal path when possible."""
    if attn_mask is None:
        return None, is_causal
    return allowed_keys(attn_mask, is_causal, T, device), False


def key_counts(allowed: Tensor | None, T: int, like: Tensor) -> Tensor:
    """n per query, (B|1, 1, T|1, 1) in like's dtype, at least 1 (see the module docstring)."""
    if allowed is None:
        return like.new_full((1, 1, 1, 1), T)
    return allowed.sum(-1, keepdim=True).clamp(min=1).to(like.dtype)


def plain(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float, score: str,
          sink: Tensor | None = None, sigmoid_bias: float | None = None, dropout_p: float = 0.0,
          ) -> tuple[Tensor, Tensor]:
    """Any score function written out in PyTorch: (o, p), p (B, H, T, T) the weights of the real keys."""
    s = (q @ k.transpose(-1, -2)) * scale
    T = k.shape[-2]
    if score in ("softmax", *NULL_KEY):
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        if score == "softmax":
            p = s.softmax(-1)
        else:  # the null slot: logit 0 (softmax1) or theta_h (sink); its weight is dropped with its zero value
            null = sink.to(s.dtype).view(1, -1, 1, 1) if score == "sink" else s.new_zeros(())
            p = torch.cat((s, null.expand(*s.shape[:-1], 1)), -1).softmax(-1)[..., :-1]
    else:
        n = key_counts(allowed, T, s)
        if score == "sigmoid":
            p = torch.sigmoid(s + (sigmoid_bias if sigmoid_bias is not None else -torch.log(n)))
        else:
            p = F.relu(s) / n
        if allowed is not None:
            p = p.masked_fill(~allowed, 0.0)
    pd = F.dropout(p, dropout_p) if dropout_p else p
    return pd @ v, p


def null_key_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                  scale: float | None, sink: Tensor | None, allowed: Tensor | None = None) -> Tensor:
    """softmax1 (sink None) and sink on SDPA, exact in exact arithmetic, with no T x T mask of our own.

    softmax1: a null key with a zero key vector and a zero value is prepended. Its score is q.0 * scale = 0
    exactly and the real keys keep theirs, so SDPA's softmax over T + 1 keys is exp(s_j) / (1 + sum exp(s))
    on them, and the zero value adds nothing to o. Causal without padding stays on is_causal kernels: a
    dummy query is prepended too, so the square causal mask lets query t + 1 see the null key and keys
    0..t; its row is dropped. Every query sees the null key: a row with no real key gives o = 0.

    sink: with Z = sum exp(s), softmax1 gives o1 = sum exp(s) v / (1 + Z) and the null key's weight
    r = 1 / (1 + Z), read from one more value channel that is 1 on the null key only. Then
    sum exp(s) v / (exp(theta) + Z) = o1 / (1 + (exp(theta) - 1) r): an elementwise rescale, so theta's
    gradient needs no float bias through SDPA (which leaves the flash kernels), and no cancellation:
    r comes out of the softmax as a weight of its own, not as 1 - sum of the others.

    `allowed` (a document mask, `Docs.allowed`) replaces the mask attn_mask and is_causal would give.
    """
    B, H, T, dq = q.shape
    dv = v.shape[-1]
    scale = scale if scale is not None else dq ** -0.5  # of the real head dim, before any padding
    if sink is not None:
        pad = 8  # the r channel (+7 zeros: head dims stay multiples of 8, as CUDA's flash kernels need)
        if dq == dv:  # equal head dims keep SDPA's flash kernels; zero channels add exactly 0 to q.k
            q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        v = F.pad(v, (0, pad))
    null_v = v.new_zeros(B, H, 1, v.shape[-1])
    if sink is not None:
        null_v[..., dv] = 1.0
    k = torch.cat((k.new_zeros(B, H, 1, k.shape[-1]), k), 2)
    v = torch.cat((null_v, v), 2)
    if allowed is None and attn_mask is None and is_causal:
        q = torch.cat((q.new_zeros(B, H, 1, q.shape[-1]), q), 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[:, :, 1:]
    else:
        if allowed is None:
            allowed = allowed_keys(attn_mask, is_causal, T, q.device)
        mask = None if allowed is None else F.pad(allowed, (1, 0), value=True)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if sink is None:
        return o
    r = o[..., dv:dv + 1]
    return o[..., :dv] / (1 + torch.expm1(sink.to(o.dtype)).view(1, H, 1, 1) * r)


# ---------------------------------------------------------------- FlexAttention
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention  # only where FlexAttention runs (CUDA)

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(attn_mask: Tensor | None, is_causal: bool, doc_ids: Tensor | None, B: int, T: int, device,
                    prefix: Tensor | None = None):
    """FlexAttention's block mask for padding, causality, documents and prefix spans (the rule of
    `allowed_keys`), or None when every key is allowed."""
    from torch.nn.attention.flex_attention import create_block_mask  # see _compiled_flex

    if attn_mask is None and not is_causal and doc_ids is None:
        return None
    pad = attn_mask.bool() if attn_mask is not None else None

    def mask_mod(b, h, qi, ki):
        keep = qi >= 0  # every key
        if pad is not None:  # no padding key for a real query (with documents, padding rows see padding)
            keep = pad[b, ki] | ~pad[b, qi] if doc_ids is not None else pad[b, ki]
        if doc_ids is not None:
            keep = keep & (doc_ids[b, qi] == doc_ids[b, ki])
        if not is_causal:
            return keep
        if prefix is not None:
            return keep & ((ki <= qi) | ((prefix[b, qi] == prefix[b, ki]) & (prefix[b, qi] > 0)))
        return keep & (ki <= qi)

    return create_block_mask(mask_mod, B, None, T, T, device=device)


def flex(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float, score: str,
         sigmoid_bias: float | None = None, compiled: bool = True, sink: Tensor | None = None,
         doc_ids: Tensor | None = None, block_mask=None, prefix: Tensor | None = None) -> Tensor:
    """Every score function on FlexAttention (k, v may have fewer heads than q: GQA). Flex normalises like
    softmax: o = sum e^m(s) v / sum e^m(s), and returns lse = log sum e^m(s).
      softmax   m(s) = s: o as is.
      softmax1  o * Z / (1 + Z) = o * sigmoid(lse); sink: o * Z / (e^theta + Z) = o * sigmoid(lse - theta).
      sigmoid / relu  m(s) = log p(s) (log sigmoid(s + b), or log relu(s): -inf at s <= 0): the weights e^m
                are p and the unnormalised sum is o * exp(lse); relu then divides by n.
    A row whose weights are all 0 comes back with o = 0 and lse = -inf: zero, not NaN. `block_mask` (built
    once per batch, `Docs.block`) replaces the one attn_mask, is_causal, doc_ids and prefix give."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # see _compiled_flex

    B, H, T, _ = q.shape
    if block_mask is None:
        block_mask = flex_block_mask(attn_mask, is_causal, doc_ids, B, T, q.device, prefix)
    fn = _compiled_flex() if compiled else flex_attention
    gqa = k.shape[1] != H
    if score in ("softmax", *NULL_KEY):
        o, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
        if score == "softmax":
            return o
        theta = sink.to(aux.lse.dtype).view(1, H, 1) if sink is not None else 0.0
        return o * torch.sigmoid(aux.lse - theta).to(o.dtype)[..., None]
    allowed = allowed_keys(attn_mask, is_causal, T, q.device, doc_ids, prefix)
    n = key_counts(allowed, T, q.float()).expand(B, 1, T, 1).reshape(B, T)
    if score == "sigmoid":
        def score_mod(s, b, h, qi, ki):
            return F.logsigmoid(s + (sigmoid_bias if sigmoid_bias is not None else -torch.log(n[b, qi])))
    else:
        def score_mod(s, b, h, qi, ki):  # the inner where keeps log's gradient finite where s <= 0
            return torch.where(s > 0, torch.log(torch.where(s > 0, s, 1.0)), float("-inf"))
    o, aux = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                return_aux=AuxRequest(lse=True))
    o = o * aux.lse.exp().to(o.dtype)[..., None]
    return o if score == "sigmoid" else o / n[:, None, :, None].to(o.dtype)


@functools.cache
def flex_usable(device_type: str) -> bool:
    """Whether FlexAttention serves sigmoid / relu, and document masks for every score, on this device: it
    must compile, train (forward and backward, through lse) and agree with the plain path; checked once per
    device type (where it fails: SDPA and the plain path with a dense mask). Never on CPU: in
    torch 2.14 FlexAttention has no CPU backward (NotImplementedError, measured) and its eager fallback
    materialises the scores as the plain path does, so the plain path is the faster trainable one there."""
    if device_type != "cuda":
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 2, 128, 16, device="cuda", generator=g, requires_grad=True) for _ in range(3))
        pad = torch.ones(2, 128, dtype=torch.bool, device="cuda")
        pad[1, 100:] = False
        docs = (torch.arange(128, device="cuda") // 40 + 1).expand(2, 128).masked_fill(~pad, 0)
        prefix = docs.masked_fill(torch.arange(128, device="cuda") % 40 >= 15, 0)  # the first 15 of each
        sink = torch.tensor([0.5, -1.0], device="cuda")
        for score, d, pre in (("sigmoid", None, None), ("relu", None, None),
                              *((s, docs, None) for s in ("softmax", *NULL_KEY, "relu")), ("sigmoid", docs, prefix)):
            a = flex(q, k, v, pad, True, 0.25, score, sink=sink if score == "sink" else None, doc_ids=d, prefix=pre)
            b = plain(q, k, v, allowed_keys(pad, True, 128, "cuda", d, pre), 0.25, score, sink)[0]
            ga, gb = (torch.autograd.grad(o.square().sum(), (q, k, v)) for o in (a, b))
            if not all(torch.allclose(x, y, rtol=1e-2, atol=1e-3) for x, y in zip((a, *ga), (b, *gb))):
                return False
        return True
    except Exception:  # noqa: BLE001 - no Triton, an older torch, no lse gradient: the plain path then
        return False


# ---------------------------------------------------------------- the module every attention class calls
class Attend(nn.Module):
    """The attention core after q, k, v: score function, dropout on the weights, the output gate.

    forward(x, q, k, v, ...) with q, k (B, H, T, d_qk), v (B, H, T, d_v) and x the attention input (the
    gate reads it) returns the concatenated head outputs (B, T, H * d_v), ready for W_O. Parameters:
    `sink` (H,) learned null logits for score=sink (no weight decay: a logit, not a projection) and
    `gate` (a Linear, decayed as every projection).
    """

    def __init__(self, d_model: int, n_heads: int, d_v: int, score: Score = "softmax", gate: Gate = "none",
                 sigmoid_bias: float | None = None, bias: bool = False):
        super().__init__()
        if sigmoid_bias is not None and score != "sigmoid":  # a silently ignored key would mislead an ablation
            raise ConfigError(f"model.attn.sigmoid_bias={sigmoid_bias}: only score=sigmoid uses it "
                              f"(model.attn.score={score!r}); set it to null")
        self.score, self.sigmoid_bias, self.n_heads = score, sigmoid_bias, n_heads
        # zeros: a sink starts as softmax1
        self.sink = nn.Parameter(torch.zeros(n_heads)) if score == "sink" else None
        self.gate = nn.Linear(d_model, gate_width(n_heads, d_v, gate), bias=bias) if gate != "none" else None
        self.probe: Callable | None = None  # set by record_attention

    @staticmethod
    def param_count(d_model: int, n_heads: int, d_v: int, score: str = "softmax", gate: str = "none",
                    bias: bool = False) -> int:
        width = gate_width(n_heads, d_v, gate)
        return (score == "sink") * n_heads + width * (d_model + bias)

    @staticmethod
    def flops(d_model: int, n_heads: int, d_qk: int, d_v: int, score: str = "softmax", gate: str = "none") -> int:
        """Forward FLOPs per token on top of the T x T scores and weighted sums: the gate projection, and
        the null key's column of q k^T and p v of softmax1 and sink (not the bookkeeping of their SDPA path:
        the causal dummy query row, sink's 8 extra channels)."""
        null = n_heads * (d_qk + d_v) if score in NULL_KEY else 0
        return 2 * (d_model * gate_width(n_heads, d_v, gate) + null)

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                docs: Docs | None = None) -> Tensor:
        """k, v may have fewer heads than q (GQA: each serves n_heads / n_kv consecutive query heads);
        `docs` (document masking) replaces the mask attn_mask and is_causal give with its own."""
        B, T = x.shape[:2]
        dropout_p = dropout_p if self.training else 0.0
        sdpa_scale, scale = scale, scale or q.shape[-1] ** -0.5  # SDPA's own default keeps softmax bit-identical
        gqa = k.shape[1] != q.shape[1]
        if docs is not None and docs.block is not None and not (dropout_p or self.probe):
            o = flex(q, k, v, attn_mask, is_causal, scale, self.score, self.sigmoid_bias, sink=self.sink,
                     block_mask=docs.block, doc_ids=docs.ids, prefix=docs.prefix)
            return self._gate(x, o)
        allowed = None
        if docs is not None:
            allowed = docs.allowed if docs.allowed is not None else allowed_keys(attn_mask, is_causal, T, x.device,
                                                                                 docs.ids, docs.prefix)
        if self.score == "softmax" and self.probe is None:
            if allowed is not None:
                mask, causal = allowed, False
            else:
                mask, causal = sdpa_mask(attn_mask, is_causal, T, x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=sdpa_scale,
                                               dropout_p=dropout_p, enable_gqa=gqa)
            return self._gate(x, o)
        if gqa:  # the paths below take equal head counts
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if allowed is None and (self.probe is not None or self.score not in NULL_KEY or dropout_p):
            allowed = allowed_keys(attn_mask, is_causal, T, x.device)
        if self.probe is not None:
            o, p = plain(q, k, v, allowed, scale, self.score, self.sink, self.sigmoid_bias, dropout_p)
            self.probe(self, p, allowed)
        elif self.score in NULL_KEY and not dropout_p:  # dropout would hit the null weight r too
            o = null_key_sdpa(q, k, v, attn_mask, is_causal, sdpa_scale, self.sink, allowed)
        elif self.score in ("sigmoid", "relu") and not dropout_p and docs is None and flex_usable(q.device.type):
            o = flex(q, k, v, attn_mask, is_causal, scale, self.score, self.sigmoid_bias)
        else:  # sigmoid and relu off CUDA; any score with dropout on the weights
            o = plain(q, k, v, allowed, scale, self.score, self.sink, self.sigmoid_bias, dropout_p)[0]
        return self._gate(x, o)

    def _gate(self, x: Tensor, o: Tensor) -> Tensor:
        """(B, H, T, d_v) head outputs -> gated, concatenated (B, T, H * d_v)."""
        B, T = x.shape[:2]
        o = o.transpose(1, 2)  # (B, T, H, d_v)
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x)).view(B, T, self.n_heads, -1)
        return o.reshape(B, T, -1)


def gate_width(n_heads: int, d_v: int, gate: str) -> int:
    return {"none": 0, "head": n_heads, "elementwise": n_heads * d_v}[gate]


@contextmanager
def record_attention(model: nn.Module, probe: Callable[[Attend, Tensor, Tensor | None], None]) -> Iterator[list]:
    """Within the block, every attention of `model` runs the plain path and calls probe(attend, p, allowed)
    with its weights p (B, H, T, T) and allowed keys (or None): for measurements, never for training."""
    mods = [m for m in model.modules() if isinstance(m, Attend)]
    for m in mods:
        m.probe = probe
    try:
        yield mods
    finally:
        for m in mods:
            m.probe = None
