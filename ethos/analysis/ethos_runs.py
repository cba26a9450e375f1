"""Our own models read into AttentionWeights: an ethos run dir / .ckpt rebuilt from its self-describing checkpoint
(ethos.pretrained.load_task), or a live backbone (the rank callback reads the model being trained, whose FSDP2
parameters are gathered whole one layer at a time)."""

from pathlib import Path

import torch
from torch import Tensor

from ethos.analysis.layouts import SUPPORTED
from ethos.analysis.weights import PARTS, AttentionWeights, out_heads, per_head
from ethos.errors import ConfigError
from ethos.models import lora
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.blocks import Block
from ethos.pretrained import load_task


def sharded(x: Tensor) -> bool:
    """A parameter sharded between ranks (FSDP2's DTensor)."""
    return hasattr(x, "full_tensor")


def whole(x: Tensor) -> Tensor:
    """A parameter whole: a sharded one is gathered from every rank, a collective that all ranks must call in the
    same order."""
    return x.full_tensor() if sharded(x) else x


# as layouts.py says of Qwen3: the gains fold into W_q, W_k (and W_kr), the per-token RMS division does not
QK_NORM_NOTE = ("QK-norm: per-head q/k RMS division not folded: it scales each score by a positive per-token "
                "factor; ranks are unaffected, sigma_1 is in weight units")


class EthosSource:
    """An ethos run dir or .ckpt: the task rebuilt from its self-describing checkpoint (encoder, decoder, ViT)."""

    def __init__(self, path: str | Path, dtype=torch.float32, model: torch.nn.Module | None = None):
        """`model`: a backbone already in memory instead of the checkpoint's (the rank callback reads the model
        being trained; the retrofit the task it has loaded)."""
        if model is None:
            model = load_task(path)[0].model
        if lora.is_lora(model):  # a LoRA fine-tune is read as the model it computes: adapters merged
            model = lora.merged(model, dtype)
        self.name, self.dtype = str(path), dtype
        self.model = model
        self.blocks = [m for m in model.modules() if isinstance(m, Block)]
        self.n_layers = len(self.blocks)
        cfg = model.cfg
        self.rope_dims = cfg.rope_dims
        self.description = (f"ethos {type(model).__name__}: {self.n_layers} layers, d {cfg.d_model}, "
                            f"{cfg.n_heads} heads")

    @torch.no_grad()
    def vocab(self) -> tuple[Tensor, Tensor] | None:
        """(E (V, d), U (d, V)) of a text backbone, the final norm's gain folded into U; None for a ViT."""
        m = self.model
        embed = getattr(m, "embed", None)
        if embed is None:
            return None
        head = m.lm_head.weight if getattr(m, "lm_head", None) is not None else embed.weight
        g = whole(m.trunk.norm.weight).detach().to(self.dtype)
        return whole(embed.weight).detach().to(self.dtype), whole(head).detach().to(self.dtype).T * g[:, None]

    @torch.no_grad()
    def read(self, layer: int, parts=PARTS) -> AttentionWeights:
        block, parts = self.blocks[layer], set(parts)
        attn, t = block.attn, (lambda x: whole(x).detach().to(self.dtype))
        g_in = t(block.attn_norm.weight)
        notes = ("LayerNorm: gain folded, centring and bias not",) if isinstance(block.attn_norm,
                                                                                  torch.nn.LayerNorm) else ()
        if isinstance(attn, MLA):
            H, d_k = attn.n_heads, attn.d_k
            w = AttentionWeights(layer, "mla", H, H, d_rope=attn.d_r, notes=notes)
            q_in, r_kv, _ = attn.split
            down = t(attn.qkv_a.weight)  # rows [W_qa (or W_q); W_kva; W_kr]
            if "o" in parts:
                w.o = (t(attn.o_a.weight).T @ t(attn.o_b.weight).T).view(H, attn.d_v, -1) if isinstance(
                    attn, MLAO) else out_heads(t(attn.out.weight), H)
            if "q" in parts:
                w.q = (per_head(t(attn.q_b.weight), H) * t(attn.q_norm.weight)[:, None] if attn.q_b is not None
                       else per_head(down[:q_in], H) * g_in[:, None])
            if "qa" in parts and attn.q_b is not None:
                w.qa = down[:q_in].T * g_in[:, None]
            w.kva = down[q_in:q_in + r_kv].T * g_in[:, None] if "kva" in parts else None
            w.kr = down[q_in + r_kv:].T * g_in[:, None] if "kr" in parts and attn.d_r else None
            kv_b = per_head(t(attn.kv_b.weight), H) * t(attn.kv_norm.weight)[:, None]  # (H, r_kv, d_k + d_v)
            w.k = kv_b[..., :d_k] if "k" in parts else None
            w.v = kv_b[..., d_k:] if "v" in parts else None
            if attn.q_head_norm is not None:  # QK-norm gains: whole heads or nope channels, and rope channels
                g_q = t(attn.q_head_norm.weight)
                g_q = torch.cat((g_q, t(attn.q_rope_norm.weight))) if attn.q_rope_norm is not None else g_q
                w.q = w.q * g_q if w.q is not None else None
                w.k = w.k * t(attn.k_head_norm.weight) if w.k is not None else None
                w.kr = w.kr * t(attn.k_rope_norm.weight) if w.kr is not None else None
                w.notes += (QK_NORM_NOTE,)
            return w
        if isinstance(attn, MHA):
            # GQA: rows [W_q (H d_h); W_k (H_kv d_h); W_v (H_kv d_h)], H_kv the run's model.attn.n_kv_heads
            H, G = attn.n_heads, attn.n_kv_heads
            w = AttentionWeights(layer, "mha", H, G, notes=notes)
            qk_norm = {"q": attn.q_head_norm, "k": attn.k_head_norm} if attn.q_head_norm is not None else {}
            for part, rows, heads in zip("qkv", t(attn.qkv.weight).split(attn.split), (H, G, G)):
                if part in parts:
                    m = per_head(rows, heads) * g_in[:, None]
                    setattr(w, part, m * t(qk_norm[part].weight) if part in qk_norm else m)
            w.o = out_heads(t(attn.out.weight), H) if "o" in parts else None
            w.notes += (QK_NORM_NOTE,) if qk_norm else ()
            return w
        raise ConfigError(f"{self.name}: layer {layer} has attention {type(attn).__name__}, not a supported layout "
                          f"(supported: {SUPPORTED})")
