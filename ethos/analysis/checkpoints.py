"""Attention weights of a checkpoint, one layer at a time, in one layout whatever the source.

Sources: a HF repo id (files fetched lazily with huggingface_hub: config, index, then only the shards that
hold the tensors asked for), a local directory of (sharded) safetensors in the HF layout, or an ethos run dir /
.ckpt (rebuilt with ethos.pretrained.load_task). `open_source(SOURCE).read(layer, parts)` returns an
`AttentionWeights`; each tensor is read with its own `safe_open`, so what stays resident is the layer's tensors
asked for, not the shards' pages.

Layout (row vectors, as in DESIGN.md: q = x W_q), every RMSNorm gain folded into the projection after it:
the block's input norm into W_q / W_k / W_v / W_qa / W_kva / W_kr, the latent norms into W_qb and W_kvb. What
is not a linear map (the RMS division, LayerNorm's centring and biases, Qwen3's per-head q/k RMS division) is
left out; `notes` says so. Projection biases, gates and sink logits are not read.
"""

import json
import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from ethos.errors import ConfigError, DataUnavailable

PARTS = ("o", "q", "k", "v", "qa", "kva", "kr")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MLA_TYPES = {"deepseek_v3": "DeepseekV3Config", "deepseek_v2": "DeepseekV2Config",
             "kimi_k2": "DeepseekV3Config (Kimi-K2)"}
GQA_TYPES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "mixtral": "MixtralConfig",
             "qwen2": "Qwen2Config", "qwen2_moe": "Qwen2MoeConfig", "qwen3": "Qwen3Config",
             "qwen3_moe": "Qwen3MoeConfig"}
SUPPORTED = ", ".join([*dict.fromkeys([*MLA_TYPES.values(), *GQA_TYPES.values()]), "ethos MHA / MLA / MLA-o"])


@dataclass
class AttentionWeights:
    """One layer's attention matrices, per head. Shapes (H query heads, G key/value heads, d model width):

    o   (H, d_v, d)     W_O_h: out = sum_h o_h W_O_h
    q   (H, q_in, d_q)  W_qb_h from the q latent (MLA, q_in = r_q) or W_Q_h from x (q_in = d); for decoupled
                        MLA the last d_rope of its d_q channels are the rope ones
    k   (G, k_in, d_k)  W_kvb_k_h from the kv latent (MLA, nope part, k_in = r_kv) or W_K_g from x
    v   (G, v_in, d_v)  W_kvb_v_h (MLA) or W_V_g
    qa  (d, r_q), kva (d, r_kv), kr (d, d_r): the MLA down-projections (None where the layer has none)

    Query head h reads key/value head `kv_head[h]` (h // (H / G), as HF's repeat_kv); q's first d_k channels
    pair with k's. Parts not asked for are None.
    """

    layer: int
    attention: str  # "mla" | "mha"
    n_heads: int
    n_kv_heads: int
    d_rope: int = 0
    o: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    qa: Tensor | None = None
    kva: Tensor | None = None
    kr: Tensor | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kv_head(self) -> Tensor:
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


def dequantize_fp8(w: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """W[i, j] = w[i, j] * scale_inv[i // bm, j // bn] for block-scaled FP8 (DeepSeek-V3), partial edge blocks
    included. In place on the one `dtype` copy: the scale is expanded along columns only (1/bm of the weight),
    full row blocks are a (M // bm, bm, N) view, the partial last row block takes the last scale row."""
    (M, N), (bm, bn) = w.shape, block
    expected = (math.ceil(M / bm), math.ceil(N / bn))
    if tuple(scale_inv.shape) != expected:
        raise ConfigError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} for a {M} x {N} weight: expected "
                          f"{expected} ({bm} x {bn} blocks, edge blocks included)")
    out = w.to(dtype)
    cols = scale_inv.to(dtype).repeat_interleave(bn, dim=1)[:, :N]
    full = M // bm * bm
    out[:full].view(M // bm, bm, N).mul_(cols[:M // bm, None, :])
    if full < M:
        out[full:].mul_(cols[-1])
    return out


class TensorReader:
    """Named tensors of safetensors files; `fetch(filename)` gives a file's local path (a path join, or a hub
    download on first use). Each read opens its file and closes it, so no mapped shard stays resident."""

    def __init__(self, weight_map: dict[str, str], fetch: Callable[[str], Path], block=(128, 128),
                 dtype: torch.dtype = torch.float32):
        self.weight_map, self.fetch, self.block, self.dtype = weight_map, fetch, tuple(block), dtype

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.fetch(self.weight_map[name])), framework="pt") as f:  # torch, never numpy
            return f.get_tensor(name)

    def __getitem__(self, name: str) -> Tensor:
        t = self.raw(name)
        if t.dtype in FP8:
            scale = name + "_scale_inv"  # may sit in another shard than its weight
            if scale not in self.weight_map:
                raise ConfigError(f"{name}: an FP8 weight without {scale} (only block-scaled FP8 is supported)")
            return dequantize_fp8(t, self.raw(scale), self.block, self.dtype)
        return t.to(self.dtype)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class RangeReader(TensorReader):
    """Safetensors files read by byte ranges (`get_range(filename, start, end)`, end exclusive): each file's header
    once, then only the bytes of the tensors asked for. On the hub this fetches a layer's attention, not the
    shards around it (DeepSeek-V3 keeps attention and experts in the same shards)."""

    def __init__(self, weight_map: dict[str, str], get_range: Callable[[str, int, int], bytes], block=(128, 128),
                 dtype: torch.dtype = torch.float32):
        super().__init__(weight_map, lambda filename: Path(filename), block, dtype)
        self.get_range, self.headers = get_range, {}

    def header(self, filename: str) -> tuple[dict, int]:
        """(the file's header, where its data starts)."""
        if filename not in self.headers:
            n = int.from_bytes(self.get_range(filename, 0, 8), "little")
            self.headers[filename] = json.loads(self.get_range(filename, 8, 8 + n)), 8 + n
        return self.headers[filename]

    def raw(self, name: str) -> Tensor:
        header, start = self.header(self.weight_map[name])
        info = header[name]
        a, b = info["data_offsets"]
        data = bytearray(self.get_range(self.weight_map[name], start + a, start + b))  # a copy torch may own
        return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def per_head(w: Tensor, heads: int) -> Tensor:
    """A Linear weight (heads * width, in) whose output rows are laid out per head -> (heads, in, width)."""
    return w.view(heads, -1, w.shape[-1]).transpose(1, 2)


def out_heads(w: Tensor, heads: int) -> Tensor:
    """An output projection's weight (d, heads * d_v), heads concatenated on its input -> (heads, d_v, d)."""
    return w.T.view(heads, -1, w.shape[0])


class HFSource:
    """A transformers-layout checkpoint: config.json plus model.safetensors(.index.json)."""

    def __init__(self, name: str, config: dict, reader: TensorReader):
        self.name, self.reader = name, reader
        self.cfg, self.attention, cls = layout(config, name)
        cfg = self.cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.prefix = layer_prefix(reader.weight_map, self.n_layers, name)
        self.description = (f"{cls}: {self.n_layers} layers, d {cfg['hidden_size']}, "
                            f"{cfg['num_attention_heads']} heads")

    def read(self, layer: int, parts=PARTS) -> AttentionWeights:
        return (self._mla if self.attention == "mla" else self._gqa)(layer, set(parts))

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
    try:
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


def local_source(root: Path, dtype=torch.float32) -> HFSource:
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root}: no config.json (SOURCE: a HF repo id, a directory with config.json and "
                          "safetensors, or an ethos run dir / .ckpt)")
    return hf_source(str(root), lambda filename: root / filename, dtype)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint (as ethos.data.hub's, whose module imports `datasets`: seconds)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_range(repo: str, revision: str | None = None) -> Callable[[str, int, int], bytes]:
    """get_range(filename, start, end) for a hub repo: an HTTP range request (as huggingface_hub's own
    safetensors metadata and file system reads)."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    def get_range(filename: str, start: int, end: int) -> bytes:
        r = get_session().get(hf_hub_url(repo, filename, revision=revision),
                              headers={**build_hf_headers(), "range": f"bytes={start}-{end - 1}"},
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(r)
        if len(r.content) != end - start:
            raise DataUnavailable(f"{repo}: {filename}: the hub ignored a byte range request; run without --ranges")
        return r.content

    return get_range


def hub_source(repo: str, revision: str | None = None, dtype=torch.float32, ranges: bool = False) -> HFSource:
    """A repo on the hub: config.json and the index first, then each shard when a tensor in it is first read,
    or with `ranges` only the bytes of the tensors read (RangeReader)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cached: dict[str, Path] = {}
    # no connection: read the HF cache only, at once, instead of minutes of HTTP retries
    cache_only = not constants.HF_HUB_OFFLINE and not hub_reachable()

    def fetch(filename: str) -> Path:
        if filename not in cached:
            try:
                cached[filename] = Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                                                        etag_timeout=5,
                                                                        local_files_only=cache_only))
            except (RepositoryNotFoundError, RevisionNotFoundError) as e:
                raise ConfigError(f"{repo}: no such repo or revision on the hub ({type(e).__name__})") from None
            except RemoteEntryNotFoundError:
                raise  # no such file in the repo: the caller decides (no index -> one model.safetensors)
            except LocalEntryNotFoundError:
                raise DataUnavailable(
                    f"{repo}: the hub cannot be reached and {filename} is not in the HF cache; pass a local copy of "
                    f"the repo as SOURCE (a directory with config.json and safetensors, e.g. from "
                    f"`hf download {repo}` on a machine with network)") from None
            except OSError as e:  # connection errors
                raise DataUnavailable(f"{repo}: the hub cannot be reached ({type(e).__name__}); pass a local "
                                      "copy of the repo (config.json + safetensors) as SOURCE") from None
        return cached[filename]

    return hf_source(repo, fetch, dtype, hub_range(repo, revision) if ranges else None)


def hf_source(name: str, fetch: Callable[[str], Path], dtype=torch.float32,
              get_range: Callable[[str, int, int], bytes] | None = None) -> HFSource:
    from huggingface_hub.errors import EntryNotFoundError

    config = json.loads(Path(fetch("config.json")).read_text())
    layout(config, name)  # before any weight is fetched
    try:
        weight_map = json.loads(Path(fetch("model.safetensors.index.json")).read_text())["weight_map"]
    except (FileNotFoundError, EntryNotFoundError, DataUnavailable):
        from safetensors import safe_open

        try:
            path = fetch("model.safetensors")
        except EntryNotFoundError:
            path = None
        if path is None or not Path(path).is_file():
            raise ConfigError(f"{name}: neither model.safetensors.index.json nor model.safetensors there") from None
        with safe_open(str(path), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    reader = (RangeReader(weight_map, get_range, block, dtype) if get_range
              else TensorReader(weight_map, fetch, block, dtype))
    return HFSource(name, config, reader)


def sharded(x: Tensor) -> bool:
    """A parameter sharded between ranks (FSDP2's DTensor)."""
    return hasattr(x, "full_tensor")


def whole(x: Tensor) -> Tensor:
    """A parameter whole: a sharded one is gathered from every rank, a collective that all ranks must call in the
    same order."""
    return x.full_tensor() if sharded(x) else x


class EthosSource:
    """An ethos run dir or .ckpt: the task rebuilt from its self-describing checkpoint (encoder, decoder, ViT)."""

    def __init__(self, path: str, dtype=torch.float32, model: torch.nn.Module | None = None):
        """`model`: a live backbone instead of a checkpoint (the rank callback reads the model being trained)."""
        from ethos.models.blocks import Block

        if model is None:
            from ethos.pretrained import load_task

            model = load_task(path)[0].model
        self.name, self.dtype = str(path), dtype
        self.blocks = [m for m in model.modules() if isinstance(m, Block)]
        self.n_layers = len(self.blocks)
        cfg = model.cfg
        self.description = (f"ethos {type(model).__name__}: {self.n_layers} layers, d {cfg.d_model}, "
                            f"{cfg.n_heads} heads")

    @torch.no_grad()
    def read(self, layer: int, parts=PARTS) -> AttentionWeights:
        from ethos.models.attention import MHA, MLA, MLAO

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
            return w
        if isinstance(attn, MHA):
            H = attn.n_heads
            w = AttentionWeights(layer, "mha", H, H, notes=notes)
            qkv = t(attn.qkv.weight).view(3, -1, g_in.shape[0])  # rows [W_q; W_k; W_v]
            for j, part in enumerate("qkv"):
                if part in parts:
                    setattr(w, part, per_head(qkv[j], H) * g_in[:, None])
            w.o = out_heads(t(attn.out.weight), H) if "o" in parts else None
            return w
        raise ConfigError(f"{self.name}: layer {layer} has attention {type(attn).__name__}, not a supported layout "
                          f"(supported: {SUPPORTED})")


def open_source(source: str, revision: str | None = None, dtype=torch.float32, ranges: bool = False):
    """HFSource or EthosSource for a SOURCE argument: an ethos run dir / .ckpt, a local directory, or a hub repo id
    (whole shards, or with `ranges` the attention tensors' bytes only)."""
    path = Path(source).expanduser()
    if path.suffix == ".ckpt" or (path.is_dir() and (path / "checkpoints").is_dir()):
        return EthosSource(str(path), dtype)
    if path.is_dir():
        return local_source(path, dtype)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return hub_source(source, revision, dtype, ranges)
    raise ConfigError(f"SOURCE={source}: not a directory, .ckpt or hub repo id (SOURCE: a HF repo id, a directory "
                      "with config.json and safetensors, or an ethos run dir / .ckpt)")
