"""Synthetic DeepSeek-V3-layout checkpoints (config.json + sharded safetensors + index), optionally FP8 with
128 x 128 block scales as DeepSeek stores them: for the tests and scripts/bench_spectra.py, never a download."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(w: Tensor, block=(128, 128)) -> tuple[Tensor, Tensor]:
    """(e4m3 weight, weight_scale_inv) with W ~= fp8 * scale_inv[i // bm, j // bn]; edge blocks are partial."""
    (M, N), (bm, bn) = w.shape, block
    Mb, Nb = math.ceil(M / bm), math.ceil(N / bn)
    padded = torch.zeros(Mb * bm, Nb * bn, dtype=torch.float32)
    padded[:M, :N] = w
    blocks = padded.view(Mb, bm, Nb, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    blocks /= scale[:, None, :, None]
    return padded[:M, :N].to(torch.float8_e4m3fn), scale


def mla_config(d: int, heads: int, q_latent: int | None, kv_latent: int, d_nope: int, d_rope: int, d_v: int,
               n_layers: int = 1, fp8: bool = False) -> dict:
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d,
           "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": n_layers,
           "q_lora_rank": q_latent, "kv_lora_rank": kv_latent, "qk_nope_head_dim": d_nope,
           "qk_rope_head_dim": d_rope, "v_head_dim": d_v}
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    return cfg


def mla_layer(cfg: dict, layer: int, generator: torch.Generator | None = None, std: float = 0.02) -> dict:
    """Random attention tensors of one DeepSeek-V3 layer (HF names, float32), norm gains around 1."""
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    r_q, r_kv = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    d_qk, d_v = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    p = f"model.layers.{layer}."

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * std

    def gain(n):
        return 0.5 + torch.rand(n, generator=generator)

    t = {p + "input_layernorm.weight": gain(d),
         p + "self_attn.kv_a_proj_with_mqa.weight": rand(r_kv + cfg["qk_rope_head_dim"], d),
         p + "self_attn.kv_a_layernorm.weight": gain(r_kv),
         p + "self_attn.kv_b_proj.weight": rand(H * (cfg["qk_nope_head_dim"] + d_v), r_kv),
         p + "self_attn.o_proj.weight": rand(d, H * d_v)}
    if r_q:
        t.update({p + "self_attn.q_a_proj.weight": rand(r_q, d), p + "self_attn.q_a_layernorm.weight": gain(r_q),
                  p + "self_attn.q_b_proj.weight": rand(H * d_qk, r_q)})
    else:
        t[p + "self_attn.q_proj.weight"] = rand(H * d_qk, d)
    return t


def write_checkpoint(root: Path, config: dict, tensors: dict[str, Tensor], shards: int = 2,
                     fp8: bool = False, norm_dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors and the index. With fp8, every 2-D weight becomes e4m3 +
    `weight_scale_inv`, each scale in the shard after its weight's (so readers must look it up), norms in
    `norm_dtype`. Returns what was stored (the FP8 pairs included)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stored, where = {}, {}
    for i, (name, w) in enumerate(tensors.items()):
        if fp8 and w.ndim == 2:
            stored[name], stored[name + "_scale_inv"] = quantize_fp8(w, config["quantization_config"]
                                                                     ["weight_block_size"])
            where[name], where[name + "_scale_inv"] = i % shards, (i + 1) % shards
        else:
            stored[name], where[name] = (w.to(norm_dtype) if fp8 and w.ndim == 1 else w), i % shards
    names = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
    for s, fname in enumerate(names):
        save_file({k: v.contiguous() for k, v in stored.items() if where[k] == s}, str(root / fname),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in stored.values())},
             "weight_map": {k: names[s] for k, s in where.items()}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return stored
