"""Transformers-layout checkpoints (config.json + model.safetensors[.index.json]) read into AttentionWeights: the
MLA layout of DeepSeek-V2/V3 and Kimi-K2 (q/kv latents, decoupled RoPE) and the MHA / GQA one of Llama, Mistral
and Qwen2/3. Which tensors a layer's matrices come from, how they split per head, which norm gains fold in."""

import re

from torch import Tensor

from ethos.analysis.readers import TensorReader
from ethos.analysis.weights import PARTS, AttentionWeights, out_heads, per_head
from ethos.errors import ConfigError

MLA_TYPES = {"deepseek_v3": "DeepseekV3Config", "deepseek_v2": "DeepseekV2Config",
             "kimi_k2": "DeepseekV3Config (Kimi-K2)"}
GQA_TYPES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "mixtral": "MixtralConfig",
             "qwen2": "Qwen2Config", "qwen2_moe": "Qwen2MoeConfig", "qwen3": "Qwen3Config",
             "qwen3_moe": "Qwen3MoeConfig"}
SUPPORTED = ", ".join([*dict.fromkeys([*MLA_TYPES.values(), *GQA_TYPES.values()]), "ethos MHA / MLA / MLA-o"])


class HFSource:
    """A transformers-layout checkpoint: its config.json (as a dict) and a reader of its tensors."""

    def __init__(self, name: str, config: dict, reader: TensorReader):
        self.name, self.reader = name, reader
        self.cfg, self.attention, cls = layout(config, name)
        cfg = self.cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.prefix = layer_prefix(reader.weight_map, self.n_layers, name)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        # RoPE channels per head: MLA's decoupled ones, or the rotated share of a GQA head (all by default)
        self.rope_dims = (cfg["qk_rope_head_dim"] if self.attention == "mla"
                          else int(head_dim * cfg.get("partial_rotary_factor", 1.0)))
        self.description = (f"{cls}: {self.n_layers} layers, d {cfg['hidden_size']}, "
                            f"{cfg['num_attention_heads']} heads")

    def read(self, layer: int, parts=PARTS) -> AttentionWeights:
        return (self._mla if self.attention == "mla" else self._gqa)(layer, set(parts))

    def vocab(self) -> tuple[Tensor, Tensor] | None:
        """(E (V, d), U (d, V)): the token embedding and the unembedding with the final norm's gain folded in
        (logits = norm(x) W_headᵀ = (x / rms) diag(g) W_headᵀ); None where the checkpoint has no embedding."""
        base, r = self.prefix.removesuffix("layers."), self.reader
        embed = base + "embed_tokens.weight"
        if embed not in r:
            return None
        e = r[embed]
        head = next((n for n in ("lm_head.weight", base + "lm_head.weight") if n in r), None)
        w = r[head] if head is not None else e  # tie_word_embeddings: the head is the embedding
        g = self._norm(base + "norm.weight") if base + "norm.weight" in r else 1.0
        return e, w.T * (g[:, None] if isinstance(g, Tensor) else g)

    def _norm(self, name: str) -> Tensor:
        return self.reader[name].to(self.reader.dtype)

    def _mla(self, i: int, parts: set) -> AttentionWeights:
        c, r, p = self.cfg, self.reader, f"{self.prefix}{i}."
        a = p + "self_attn."
        H, d_nope, d_r = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        r_kv = c["kv_lora_rank"]
        w = AttentionWeights(i, "mla", H, H, d_rope=d_r)
        x_side = parts & {"qa", "kva", "kr"} or ("q" in parts and not c.get("q_lora_rank"))
        g_in = self._norm(p + "input_layernorm.weight") if x_side else None  # read once per layer, when needed
        if "o" in parts:
            w.o = out_heads(r[a + "o_proj.weight"], H)
        if c.get("q_lora_rank"):
            if "q" in parts:
                w.q = per_head(r[a + "q_b_proj.weight"], H) * self._norm(a + "q_a_layernorm.weight")[:, None]
            if "qa" in parts:
                w.qa = r[a + "q_a_proj.weight"].T * g_in[:, None]
        elif "q" in parts:
            w.q = per_head(r[a + "q_proj.weight"], H) * g_in[:, None]
        if parts & {"kva", "kr"}:
            kv_a = r[a + "kv_a_proj_with_mqa.weight"]  # rows [W_kva; W_kr]
            w.kva = kv_a[:r_kv].T * g_in[:, None] if "kva" in parts else None
            w.kr = kv_a[r_kv:].T * g_in[:, None] if "kr" in parts else None
        if parts & {"k", "v"}:
            # W_kvb rows are per head (H, d_nope + d_v): split each head, never the whole matrix in two blocks
            kv_b = per_head(r[a + "kv_b_proj.weight"], H) * self._norm(a + "kv_a_layernorm.weight")[:, None]
            w.k = kv_b[..., :d_nope] if "k" in parts else None
            w.v = kv_b[..., d_nope:] if "v" in parts else None
        return w

    def _gqa(self, i: int, parts: set) -> AttentionWeights:
        c, r, p = self.cfg, self.reader, f"{self.prefix}{i}."
        a = p + "self_attn."
        H, G = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        w = AttentionWeights(i, "mha", H, G)
        g_in = self._norm(p + "input_layernorm.weight") if parts & {"q", "k", "v"} else None
        if "o" in parts:
            w.o = out_heads(r[a + "o_proj.weight"], H)
        for part, heads in (("q", H), ("k", G), ("v", G)):
            if part in parts:
                m = per_head(r[a + f"{part}_proj.weight"], heads) * g_in[:, None]
                if a + f"{part}_norm.weight" in r:  # Qwen3: RMSNorm over each head after the projection
                    m = m * self._norm(a + f"{part}_norm.weight")
                setattr(w, part, m)
        if a + "q_norm.weight" in r:
            w.notes = ("per-head q/k RMS division not folded: it scales each score by a positive per-token "
                       "factor; ranks are unaffected, sigma_1 is in weight units",)
        return w


def layout(config: dict, name: str) -> tuple[dict, str, str]:
    """(the language model's config, "mla" | "mha", config class name) of a config.json; unknown ones fail."""
    cfg = config.get("text_config") or config  # multimodal wrappers keep the language model's config inside
    mt, arch = cfg.get("model_type", config.get("model_type")), (config.get("architectures") or [None])[0]
    cls = config_class(mt, arch)
    if mt in MLA_TYPES:
        return cfg, "mla", cls
    if mt in GQA_TYPES:
        return cfg, "mha", cls
    raise ConfigError(f"{name}: {cls} is not a supported layout (supported: {SUPPORTED})")


def config_class(model_type: str | None, arch: str | None) -> str:
    known = {**MLA_TYPES, **GQA_TYPES}
    if model_type in known:
        return known[model_type]
    try:  # transformers takes about a second to import, and is needed only to name an unknown config here
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return CONFIG_MAPPING_NAMES[model_type]
    except (ImportError, KeyError):
        return f"{arch or 'config'} (model_type={model_type})"


def layer_prefix(weight_map: dict, n_layers: int, name: str) -> str:
    """The key prefix of the language model's layers ('model.layers.'): the one that holds self_attn of layers
    0 .. n_layers - 1 (a vision tower's layers, or DeepSeek's extra MTP layer, do not decide it)."""
    found: dict[str, set] = {}
    for key in weight_map:
        m = re.match(r"^(.*?layers\.)(\d+)\.self_attn\.", key)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, layers in sorted(found.items(), key=lambda kv: len(kv[0])):
        if set(range(n_layers)) <= layers:
            return prefix
    raise ConfigError(f"{name}: no '<prefix>layers.<i>.self_attn.*' tensors for layers 0..{n_layers - 1} "
                      f"(found prefixes: {sorted(found) or 'none'})")
