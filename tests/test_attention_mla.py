"""MLA / MLA-o against references: HF DeepseekV3Attention on copied weights, a float64 per-head einsum
implementation (also with QK-norm), exact constructions (MLA-o -> MLA, MLA -> MHA), closed-form parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from ethos.errors import ConfigError
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.rope import Rotary


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize_norms(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.RMSNorm):
                mod.weight.uniform_(0.5, 1.5)


# ---------------------------------------------------------------- HF DeepSeek-V3 (causal, decoupled)
def hf_pair(q_lora_rank, rope_interleave, seed=0):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                           q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=24, rope_interleave=rope_interleave,
                           max_position_embeddings=64, attn_implementation="eager")
    hf, rot = DeepseekV3Attention(cfg, layer_idx=0).eval(), DeepseekV3RotaryEmbedding(cfg)
    ours = MLA(64, 4, head_dim=16, rope_dims=8, rope_interleave=rope_interleave, max_seq_len=64,
               q_latent=q_lora_rank, kv_latent=16, v_head_dim=24, rope_style="decoupled").eval()
    return hf, rot, ours


def hf_to_ours(hf, ours):
    q = hf.q_a_proj.weight if hf.q_a_proj is not None else hf.q_proj.weight
    with torch.no_grad():
        ours.qkv_a.weight.copy_(torch.cat((q, hf.kv_a_proj_with_mqa.weight)))
        if hf.q_a_proj is not None:
            ours.q_norm.weight.copy_(hf.q_a_layernorm.weight)
            ours.q_b.weight.copy_(hf.q_b_proj.weight)
        ours.kv_norm.weight.copy_(hf.kv_a_layernorm.weight)
        ours.kv_b.weight.copy_(hf.kv_b_proj.weight)
        ours.out.weight.copy_(hf.o_proj.weight)


def ours_to_hf(ours, hf):
    q, kv_a = ours.qkv_a.weight.split([ours.split[0], sum(ours.split[1:])])
    with torch.no_grad():
        (hf.q_a_proj if hf.q_a_proj is not None else hf.q_proj).weight.copy_(q)
        hf.kv_a_proj_with_mqa.weight.copy_(kv_a)
        if hf.q_a_proj is not None:
            hf.q_a_layernorm.weight.copy_(ours.q_norm.weight)
            hf.q_b_proj.weight.copy_(ours.q_b.weight)
        hf.kv_a_layernorm.weight.copy_(ours.kv_norm.weight)
        hf.kv_b_proj.weight.copy_(ours.kv_b.weight)
        hf.o_proj.weight.copy_(ours.out.weight)


@pytest.mark.parametrize("q_lora_rank", [32, None])  # None: HF uses a direct q_proj, no norm (= q_latent null)
@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
@pytest.mark.parametrize("tables", ["own", "shared"])  # built by the layer, or a trunk's Rotary (longer)
def test_mla_matches_hf_deepseek_v3(q_lora_rank, rope_interleave, direction, tables):
    hf, rot, ours = hf_pair(q_lora_rank, rope_interleave)
    if direction == "hf_to_ours":
        randomize_norms(hf)
        hf_to_ours(hf, ours)
    else:
        randomize_norms(ours)
        ours_to_hf(ours, hf)
    B, T = 2, 11
    x = torch.randn(B, T, 64)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    # HF's eager path takes an additive causal mask; its rope de-interleaves q/k channels before
    # rotating, ours rotates in place: a permutation applied to both q and k, so scores are equal
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    cos, sin = rot(x, torch.arange(T)[None].expand(B, T))
    y_hf = hf(x_hf, position_embeddings=(cos, sin), attention_mask=mask)[0]
    rope = Rotary(8, max_seq_len=64)(T, x.dtype) if tables == "shared" else None
    y = ours(x_ours, is_causal=True, rope=rope)
    assert rel(y, y_hf) < 1e-5
    g = torch.randn_like(y)
    (y_hf * g).sum().backward()
    (y * g).sum().backward()
    assert rel(x_ours.grad, x_hf.grad) < 1e-5


# ---------------------------------------------------------------- float64 per-head reference
def naive_rope(x, dims, interleave, theta=10000.0):
    """Rotate channel pairs of x[..., :dims] (x: B, T, ..., D) by position * theta^(-2i/dims)."""
    if dims == 0:
        return x
    T = x.shape[1]
    i = torch.arange(dims // 2, dtype=torch.float64)
    a, b = (2 * i, 2 * i + 1) if interleave else (i, i + dims // 2)
    a, b = a.long(), b.long()
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2 * i / dims)  # (T, dims/2)
    shape = (1, T) + (1,) * (x.dim() - 3) + (dims // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    out = x.clone()
    out[..., a] = x[..., a] * cos - x[..., b] * sin
    out[..., b] = x[..., a] * sin + x[..., b] * cos
    return out


def naive_mla(m, x, pad, causal, interleave):
    """Per-head einsum MLA/MLA-o straight from the equations (float64, explicit softmax)."""
    W = {k: v.double() for k, v in m.named_parameters()}
    B, T, _ = x.shape
    H, dk, dv, dr = m.n_heads, m.d_k, m.d_v, m.d_r
    rms = lambda z, g: z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * g
    q_in, c_kv, k_r = (x @ W["qkv_a.weight"].T).split(m.split, dim=-1)
    q = rms(q_in, W["q_norm.weight"]) @ W["q_b.weight"].T if m.q_latent else q_in
    q = q.view(B, T, H, dk + dr)
    kv = (rms(c_kv, W["kv_norm.weight"]) @ W["kv_b.weight"].T).view(B, T, H, dk + dv)  # per-head rows
    k, v = kv[..., :dk], kv[..., dk:]
    if m.q_head_norm is not None:  # QK-norm before RoPE: whole heads, or (decoupled) nope and rope parts apart
        q = torch.cat((rms(q[..., :dk], W["q_head_norm.weight"]),
                       rms(q[..., dk:], W["q_rope_norm.weight"]) if dr else q[..., dk:]), -1)
        k = rms(k, W["k_head_norm.weight"])
        k_r = rms(k_r, W["k_rope_norm.weight"]) if dr else k_r
    if dr:
        q = torch.cat((q[..., :dk], naive_rope(q[..., dk:], dr, interleave)), -1)
        k = torch.cat((k, naive_rope(k_r, dr, interleave)[:, :, None].expand(B, T, H, dr)), -1)
    else:
        q, k = naive_rope(q, m.rope_dims, interleave), naive_rope(k, m.rope_dims, interleave)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dk + dr)
    allowed = pad[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhts,bshd->bthd", p, v)  # (B, T, H, d_v)
    if isinstance(m, MLAO):  # sum over heads of o_h W_OA_h, then the shared W_OB
        w_oa = W["o_a.weight"].T.reshape(H, dv, -1)  # stacked rows -> per-head (d_v, d_o) blocks
        return torch.einsum("bthd,hde->bte", o, w_oa) @ W["o_b.weight"].T
    return o.reshape(B, T, H * dv) @ W["out.weight"].T


CASES = [  # (class, kwargs)
    (MLA, {"q_latent": 24, "kv_latent": 16, "rope_style": "partial"}),
    (MLA, {"q_latent": None, "kv_latent": 16, "v_head_dim": 12, "rope_style": "decoupled"}),
    (MLAO, {"q_latent": 24, "kv_latent": 16, "o_latent": 20, "rope_style": "partial"}),
    (MLAO, {"q_latent": 24, "kv_latent": 16, "o_latent": 20, "v_head_dim": 12, "rope_style": "decoupled"}),
    # QK-norm (RMSNorm, then RoPE): partial normalises whole heads, decoupled the nope and rope parts apart
    (MLA, {"q_latent": 24, "kv_latent": 16, "rope_style": "partial", "qk_norm": True}),
    (MLA, {"q_latent": None, "kv_latent": 16, "v_head_dim": 12, "rope_style": "decoupled", "qk_norm": True}),
    (MLAO, {"q_latent": 24, "kv_latent": 16, "o_latent": 20, "rope_style": "decoupled", "qk_norm": True}),
]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_matches_float64_reference(cls, kw, causal, interleave):
    torch.manual_seed(1)
    m = cls(48, 4, head_dim=16, rope_dims=8, rope_interleave=interleave, **kw).double()
    randomize_norms(m)
    x = torch.randn(3, 9, 48, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(3, 9, dtype=torch.bool)
    pad[1, 6:] = False  # right padding: every query keeps at least one real key
    pad[2, 3:] = False
    g = torch.randn(3, 9, 48, dtype=torch.float64)
    y = m(x, attn_mask=pad, is_causal=causal)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    y_ref = naive_mla(m, x, pad, causal, interleave)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *m.parameters()])
    assert rel(y, y_ref) < 1e-10
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads, grads_ref):
        assert rel(a, b) < 1e-10, name


# ---------------------------------------------------------------- constructions
def test_mla_o_with_identity_w_ob_equals_mla():
    torch.manual_seed(2)
    kw = {"head_dim": 16, "rope_dims": 8, "q_latent": 24, "kv_latent": 16}
    mla = MLA(64, 4, **kw).double()
    mlao = MLAO(64, 4, o_latent=64, **kw).double()
    state = {k: v for k, v in mla.state_dict().items() if not k.startswith("out.")}
    state |= {"o_a.weight": mla.out.weight, "o_b.weight": torch.eye(64, dtype=torch.float64)}
    mlao.load_state_dict(state)
    x = torch.randn(2, 7, 64, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = mla(x, is_causal=True), mlao(x2, is_causal=True)
    assert rel(y2, y) < 1e-12
    y.sum().backward()
    y2.sum().backward()
    assert rel(x2.grad, x.grad) < 1e-12


@pytest.mark.parametrize("q_latent", [None, 64])
def test_full_rank_mla_represents_mha(q_latent):
    """W_kva (and W_qa) = an orthogonal Q: on RMS-normalised input (what a pre-norm block feeds
    attention) the latent RMSNorm is then the identity (gain sqrt(1 + eps) cancels eps), and
    W_kvb_h = [W_k_h; W_v_h] Q^T recovers MHA's keys and values exactly."""
    torch.manual_seed(3)
    d, H, dh, eps = 64, 4, 16, 1e-6
    mha = MHA(d, H, dh, rope_dims=8).double()
    mla = MLA(d, H, dh, rope_dims=8, q_latent=q_latent, kv_latent=d, norm_eps=eps).double()
    Wq, Wk, Wv = mha.qkv.weight.detach().chunk(3)
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    Qq = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    kvb = torch.cat(((Wk @ Q.T).view(H, dh, d), (Wv @ Q.T).view(H, dh, d)), dim=1).reshape(-1, d)
    with torch.no_grad():
        mla.qkv_a.weight.copy_(torch.cat((Qq if q_latent else Wq, Q)))
        if q_latent:
            mla.q_b.weight.copy_(Wq @ Qq.T)
            mla.q_norm.weight.fill_(math.sqrt(1 + eps))
        mla.kv_norm.weight.fill_(math.sqrt(1 + eps))
        mla.kv_b.weight.copy_(kvb)
        mla.out.weight.copy_(mha.out.weight)
    x = F.rms_norm(torch.randn(2, 10, d, dtype=torch.float64), (d,))
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, 7:] = False
    assert rel(mla(x, attn_mask=pad), mha(x, attn_mask=pad)) < 1e-10


# ---------------------------------------------------------------- parameter counts and validation
@pytest.mark.parametrize("cls,kw", [
    (MHA, {}), (MHA, {"bias": True}),
    (MLA, {"q_latent": 64, "kv_latent": 32}),
    (MLA, {"q_latent": None, "kv_latent": 32, "v_head_dim": 48, "rope_style": "decoupled", "bias": True}),
    (MLAO, {"q_latent": 64, "kv_latent": 32, "o_latent": 64}),
    (MLAO, {"q_latent": None, "kv_latent": 32, "o_latent": 96, "v_head_dim": 16, "rope_style": "decoupled",
            "bias": True}),
    (MHA, {"n_kv_heads": 2, "bias": True}), (MHA, {"n_kv_heads": 1, "qk_norm": True, "score": "sink"}),
    (MLA, {"q_latent": 64, "kv_latent": 32, "qk_norm": True}),
    (MLA, {"q_latent": None, "kv_latent": 32, "rope_style": "decoupled", "qk_norm": True}),
    (MLAO, {"q_latent": 64, "kv_latent": 32, "o_latent": 64, "rope_style": "decoupled", "qk_norm": True}),
])
def test_param_count_closed_form(cls, kw):
    with torch.device("meta"):
        m = cls(256, 8, head_dim=32, rope_dims=16, **kw)
    assert cls.param_count(256, 8, head_dim=32, rope_dims=16, **kw) == sum(p.numel() for p in m.parameters())


# exact counts of our encoder at the reference sizes with the BERT vocabulary, and the reference's
# own (its "M" is 2**20; it has FFN biases, no final norm and no MLM bias: docs/param_counts.md)
REFERENCE = {"mha": (14_138_938, 14_121_984, 13.47), "mla": (13_303_930, 13_286_976, 12.67),
             "mla_o": (13_107_322, 13_090_368, 12.48)}


@pytest.mark.parametrize("variant", REFERENCE)
def test_reference_experiment_param_counts(variant):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ethos.config import CONF_DIR, register_resolvers
    from ethos.models.blocks import count_params
    from ethos.models.encoder import Encoder

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment=subspace_encoder_{variant}"])
    with torch.device("meta"):
        enc = Encoder(instantiate(cfg.model, _convert_="object"), vocab_size=30522)
    ours, ref_exact, ref_reported = REFERENCE[variant]
    counts = count_params(enc)
    assert counts["params/total"] == ours
    ffn_bias, final_norm, mlm_bias = 6 * (1024 + 1024 + 256), 256, 30522
    assert ours - final_norm - mlm_bias + ffn_bias == ref_exact
    assert round(ref_exact / 2**20, 2) == ref_reported
    assert abs(ours / 2**20 - ref_reported) / ref_reported < 0.01
    attn = counts["params/attention"]
    mod = type(enc.trunk.blocks[0].attn)
    per_layer = mod.param_count(**{**cfg.model.attn, "d_model": 256, "n_heads": 8, "head_dim": 32,
                                   "rope_dims": cfg.model.rope_dims})
    assert attn == 6 * per_layer


def test_dense_layers_stay_mha():
    from functools import partial

    from ethos.models.blocks import Trunk
    from ethos.models.config import ModelConfig
    from ethos.models.ffn import SwiGLU

    cfg = ModelConfig(attn=partial(MLA, q_latent=16, kv_latent=8), ffn=partial(SwiGLU, d_ff=64),
                      d_model=32, n_layers=3, n_heads=4, rope_dims=4, num_dense_layers=1,
                      dense_attn=partial(MHA))
    trunk = Trunk(cfg)
    assert [type(b.attn) for b in trunk.blocks] == [MHA, MLA, MLA]
    x = torch.randn(2, 5, 32)
    assert torch.isfinite(trunk(x, is_causal=True)).all()


@pytest.mark.parametrize("override,key", [
    ("model.attn.kv_latent=0", "model.attn.kv_latent=0: must be an integer > 0"),
    ("model.attn.q_latent=-3", "model.attn.q_latent=-3: must be an integer > 0 or null"),
    ("model.attn.v_head_dim=0", "model.attn.v_head_dim=0"),
    ("model.attn.rope_style=full", "model.attn.rope_style='full': must be one of 'partial', 'decoupled'"),
])
def test_config_errors_name_the_key(override, key, tmp_path):
    from conftest import compose
    from ethos.config import validate

    for model in ("mla", "mla_o"):
        with pytest.raises(ConfigError) as e:  # types and ranges: the signature, checked before any build
            validate(compose([f"model={model}", override], output_dir=tmp_path))
        assert str(e.value).startswith(key) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.attn.o_latent=0"):
        validate(compose(["model=mla_o", "model.attn.o_latent=0"], output_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.rope_dims=0"):  # a rule across keys: the constructor's
        MLA(d_model=32, n_heads=4, rope_dims=0, rope_style="decoupled")


# ---------------------------------------------------------------- rope_dims bounds by RoPE style
def _model_cfg(attn, rope_dims, **kw):
    from functools import partial

    from ethos.models.config import ModelConfig
    from ethos.models.ffn import SwiGLU

    return ModelConfig(attn=attn, ffn=partial(SwiGLU, d_ff=32), d_model=32, n_layers=2, n_heads=4,
                       rope_dims=rope_dims, **kw)  # head_dim 8


def test_decoupled_rope_dims_may_exceed_head_dim():
    """Decoupled RoPE adds d_r channels next to d_nope = head_dim: d_r > d_nope is a valid config (and
    runs); partial RoPE rotates channels of a head, so it stays bounded by head_dim."""
    from functools import partial

    from ethos.models.blocks import Trunk

    cfg = _model_cfg(partial(MLA, q_latent=16, kv_latent=8, rope_style="decoupled"), rope_dims=12)
    trunk = Trunk(cfg)
    assert trunk.blocks[0].attn.d_qk == 8 + 12
    assert torch.isfinite(trunk(torch.randn(2, 5, 32), is_causal=True)).all()
    for attn in (partial(MLA, q_latent=16, kv_latent=8), partial(MLA, rope_style="partial"), partial(MHA)):
        with pytest.raises(ConfigError, match="model.rope_dims=12: must be even and between 0 and the head dim 8"):
            _model_cfg(attn, rope_dims=12)
    with pytest.raises(ConfigError, match="model.rope_dims=11: must be even"):
        _model_cfg(partial(MLA, rope_style="decoupled"), rope_dims=11)
    # dense MHA layers of a decoupled model rotate inside their heads: bounded again
    with pytest.raises(ConfigError, match="model.rope_dims=12: .*head dim 8"):
        _model_cfg(partial(MLA, rope_style="decoupled"), rope_dims=12, num_dense_layers=1, dense_attn=partial(MHA))
    _model_cfg(partial(MLA, rope_style="decoupled"), rope_dims=12, num_dense_layers=1)  # dense = same MLA


def test_decoupled_rope_dims_through_hydra(tmp_path):
    from conftest import compose
    from ethos.checks import build_model_config

    cfg = build_model_config(compose(["model=mla", "model.attn.rope_style=decoupled", "model.rope_dims=48"],
                                     output_dir=tmp_path))
    assert cfg.rope_dims == 48 > cfg.head_dim == 32
    with pytest.raises(ConfigError, match="model.rope_dims=48: must be even and between 0 and the head dim 32"):
        build_model_config(compose(["model=mla", "model.rope_dims=48"], output_dir=tmp_path))
