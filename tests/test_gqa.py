"""GQA / MQA and QK-norm against references: HF transformers' LlamaAttention (GQA) and Qwen3Attention (GQA with
QK-norm) on copied weights, the same MHA with key/value weights duplicated per group (every score function), a
float64 RMSNorm-then-RoPE-then-attention reference; the config wiring of model=gqa and its one-line error."""

import math

import pytest
import torch

from ethos.errors import ConfigError
from ethos.models.attention import MHA
from ethos.models.rope import rope_tables
from ethos.models.scores import docs_mask

B, T, D, H, DH = 2, 11, 64, 8, 16  # head_dim 16: H * d_h = 128 != d, so nothing relies on d_model // n_heads


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def causal_additive(T: int, dtype) -> torch.Tensor:
    """HF's eager / sdpa 4-D attention mask: 0 where allowed, the dtype's min above the diagonal."""
    return torch.full((T, T), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


# ---------------------------------------------------------------- HF transformers (Llama, Qwen3)
def hf_attention(kind: str, n_kv: int, impl: str):
    """A float64 LlamaAttention / Qwen3Attention built from a local config (no download), its rotary embedding,
    and our MHA (RoPE on every head channel, rotate_half pairing) with its weights copied in."""
    if kind == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention as Attention
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary

        cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=n_kv, head_dim=DH,
                          attention_bias=False, rope_theta=500.0, max_position_embeddings=64)
    else:
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Attention
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary

        cfg = Qwen3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=n_kv, head_dim=DH,
                          attention_bias=False, rope_theta=500.0, max_position_embeddings=64, rms_norm_eps=1e-5)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    hf = Attention(cfg, layer_idx=0).double().eval()
    ours = MHA(D, H, head_dim=DH, rope_dims=DH, rope_theta=500.0, n_kv_heads=n_kv, qk_norm=kind == "qwen3",
               norm_eps=1e-5).double()
    with torch.no_grad():
        if kind == "qwen3":
            hf.q_norm.weight.uniform_(0.5, 1.5)
            hf.k_norm.weight.uniform_(0.5, 1.5)
            ours.q_head_norm.weight.copy_(hf.q_norm.weight)
            ours.k_head_norm.weight.copy_(hf.k_norm.weight)
        ours.qkv.weight.copy_(torch.cat((hf.q_proj.weight, hf.k_proj.weight, hf.v_proj.weight)))
        ours.out.weight.copy_(hf.o_proj.weight)
    return hf, Rotary(cfg), ours


@pytest.mark.parametrize("n_kv", [1, 2, H])  # MQA, GQA (4 query heads per key/value head), MHA
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gqa_equals_hf_llama_attention(n_kv, impl):
    """Causal, RoPE on all head channels, float64. Both rotate with HF's tables (our rope argument takes their
    first half: cos = cat(freqs, freqs)), so only the attention math is compared: to 1e-10 on HF's sdpa path,
    1e-6 on eager (its softmax runs in float32). Our own float64 tables agree with HF's float32 ones to 1e-6."""
    hf, rot, ours = hf_attention("llama", n_kv, impl)
    x = torch.randn(B, T, D, dtype=torch.float64)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    cos, sin = rot(x, torch.arange(T)[None].expand(B, T))
    y_hf = hf(x_hf, position_embeddings=(cos, sin), attention_mask=causal_additive(T, x.dtype))[0]
    y = ours(x_ours, is_causal=True, rope=(cos[0, :, :DH // 2], sin[0, :, :DH // 2]))
    tol = 1e-10 if impl == "sdpa" else 1e-6
    assert rel(y, y_hf) < tol
    g = torch.randn_like(y)
    (y_hf * g).sum().backward()
    (y * g).sum().backward()
    assert rel(x_ours.grad, x_hf.grad) < tol
    assert rel(ours(x, is_causal=True), y_hf) < 1e-6  # rope=None: the layer's own tables


@pytest.mark.parametrize("n_kv", [1, 2, H])
def test_gqa_with_qk_norm_equals_hf_qwen3_attention(n_kv):
    """Qwen3: RMSNorm over each q and k head (learned gains of head width) before RoPE, GQA. Qwen3's RMSNorm
    runs in float32, hence 1e-6."""
    hf, rot, ours = hf_attention("qwen3", n_kv, "sdpa")
    x = torch.randn(B, T, D, dtype=torch.float64)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    cos, sin = rot(x, torch.arange(T)[None].expand(B, T))
    y_hf = hf(x_hf, position_embeddings=(cos, sin), attention_mask=causal_additive(T, x.dtype))[0]
    y = ours(x_ours, is_causal=True, rope=(cos[0, :, :DH // 2], sin[0, :, :DH // 2]))
    assert rel(y, y_hf) < 1e-6
    g = torch.randn_like(y)
    (y_hf * g).sum().backward()
    (y * g).sum().backward()
    assert rel(x_ours.grad, x_hf.grad) < 1e-6


# ---------------------------------------------------------------- GQA = MHA with duplicated key/value heads
def duplicated(gqa: MHA, **kw) -> MHA:
    """The MHA (built with `kw`) whose key/value head h is GQA's head h // (H / H_kv): W_k, W_v and their biases
    repeated per group, every other weight copied."""
    H, G, d_h = gqa.n_heads, gqa.n_kv_heads, gqa.head_dim
    mha = MHA(D, H, head_dim=d_h, **kw).double()
    state = dict(gqa.state_dict())
    for name in ("qkv.weight", "qkv.bias"):
        if name in state:
            q, k, v = state[name].split(gqa.split)
            k, v = (t.view(G, d_h, *t.shape[1:]).repeat_interleave(H // G, 0).reshape(H * d_h, *t.shape[1:])
                    for t in (k, v))
            state[name] = torch.cat((q, k, v))
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("score", ["softmax", "softmax1", "sink", "sigmoid", "relu"])
@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_equals_mha_with_duplicated_key_value_heads(score, n_kv):
    """Every score function (the non-SDPA paths repeat k, v themselves), with padding, causal, packed documents,
    a gate and biases, float64: outputs, input gradients, and the gradient of each shared W_k / W_v head as the
    sum over its group."""
    torch.manual_seed(1)
    kw = {"rope_dims": 8, "bias": True, "score": score, "gate": "elementwise"}
    gqa = MHA(D, H, head_dim=DH, n_kv_heads=n_kv, **kw).double()
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_(0, 0.2)  # sink logits and biases away from their zero init
    mha = duplicated(gqa, **kw)
    x = torch.randn(3, T, D, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(3, T, dtype=torch.bool)
    pad[1, 7:] = False
    pad[2, 3:] = False
    g = torch.randn(3, T, D, dtype=torch.float64)
    docs = docs_mask((torch.arange(T) // 4 + 1).expand(3, T).masked_fill(~pad, 0), pad, True)
    for causal, d in ((False, None), (True, None), (True, docs)):
        y, y_ref = (m(x, attn_mask=pad, is_causal=causal, docs=d) for m in (gqa, mha))
        assert rel(y[pad], y_ref[pad]) < 1e-12
        (gx, gw), (gx_ref, gw_ref) = (torch.autograd.grad((o[pad] * g[pad]).sum(), (x, m.qkv.weight))
                                      for o, m in ((y, gqa), (y_ref, mha)))
        assert rel(gx, gx_ref) < 1e-12
        q, k, v = gw.split(gqa.split)
        q_ref, k_ref, v_ref = gw_ref.split(mha.split)
        per_group = lambda t: t.view(n_kv, H // n_kv, DH, D).sum(1).reshape(n_kv * DH, D)  # noqa: E731
        assert rel(q, q_ref) < 1e-12
        assert rel(k, per_group(k_ref)) < 1e-12 and rel(v, per_group(v_ref)) < 1e-12


# ---------------------------------------------------------------- QK-norm: RMSNorm, then RoPE, then attention
def naive_mha(m: MHA, x, pad, causal):
    """Float64, from the equations: per-head projections, RMSNorm of each q / k head with its gain, RoPE (rotate
    halves), key/value head h // (H / H_kv) for query head h, an explicit softmax."""
    H, G, d_h, r, eps = m.n_heads, m.n_kv_heads, m.head_dim, m.rope_dims, m.q_head_norm.eps
    Wq, Wk, Wv = m.qkv.weight.split(m.split)
    rms = lambda z, g: z / z.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * g  # noqa: E731
    cos, sin = rope_tables(r, x.shape[1], m.rope_theta, torch.float64)

    def rotate(z):  # (B, T, d_h): pairs (i, i + r/2) of the first r channels
        a, b, rest = z[..., :r // 2], z[..., r // 2:r], z[..., r:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos, rest), -1)

    allowed = pad[:, None, :] & (torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril() if causal else True)
    heads = []
    for h in range(H):
        gk = h // (H // G)
        q = rotate(rms(x @ Wq[h * d_h:(h + 1) * d_h].T, m.q_head_norm.weight))
        k = rotate(rms(x @ Wk[gk * d_h:(gk + 1) * d_h].T, m.k_head_norm.weight))
        v = x @ Wv[gk * d_h:(gk + 1) * d_h].T
        s = (q @ k.transpose(1, 2) / math.sqrt(d_h)).masked_fill(~allowed, float("-inf"))
        heads.append(s.softmax(-1) @ v)
    return torch.cat(heads, -1) @ m.out.weight.T


@pytest.mark.parametrize("n_kv", [1, 2, H])
@pytest.mark.parametrize("causal", [False, True])
def test_qk_norm_mha_equals_float64_reference(n_kv, causal):
    torch.manual_seed(2)
    m = MHA(D, H, head_dim=DH, rope_dims=8, n_kv_heads=n_kv, qk_norm=True, norm_eps=1e-5).double()
    with torch.no_grad():
        m.q_head_norm.weight.uniform_(0.5, 1.5)
        m.k_head_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, T, D, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(3, T, dtype=torch.bool)
    pad[1, 6:] = False
    y, y_ref = m(x, attn_mask=pad, is_causal=causal), naive_mha(m, x, pad, causal)
    assert rel(y[pad], y_ref[pad]) < 1e-10
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y[pad] * g[pad]).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((y_ref[pad] * g[pad]).sum(), [x, *m.parameters()])
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads, grads_ref):
        assert rel(a, b) < 1e-10, name


def test_qk_norm_bounds_the_logits():
    """Why QK-norm: with the gains at 1, |q.k| <= d_h however large the projections grow, so the logits stay
    bounded (the runaway the papers report); without it they grow with the weights squared."""
    torch.manual_seed(3)
    x = torch.randn(2, T, D, dtype=torch.float64)
    seen = {}
    for qk_norm in (False, True):
        m = MHA(D, H, head_dim=DH, n_kv_heads=2, qk_norm=qk_norm).double()
        with torch.no_grad():
            m.qkv.weight.mul_(100.0)
        m.attend.register_forward_pre_hook(lambda mod, args, key=qk_norm: seen.__setitem__(key, args[1:3]))
        m(x)
    logit = lambda q, k: (q @ k.repeat_interleave(H // 2, 1).transpose(-1, -2)).abs().max()  # noqa: E731
    assert logit(*seen[True]) <= DH < logit(*seen[False])


# ---------------------------------------------------------------- config: model=gqa, the error
def test_model_gqa_builds_mqa_and_qk_norm_from_hydra(tmp_path):
    from conftest import compose
    from ethos.checks import build_model_config
    from ethos.models.blocks import Trunk

    cfg = build_model_config(compose(["model=gqa"], output_dir=tmp_path))
    assert [b.attn.n_kv_heads for b in Trunk(cfg).blocks] == [2] * cfg.n_layers
    cfg = build_model_config(compose(["model=gqa", "model.attn.n_kv_heads=1", "model.attn.qk_norm=true",
                                      "model.norm_eps=1e-5"], output_dir=tmp_path))
    attn = Trunk(cfg).blocks[0].attn
    assert attn.n_kv_heads == 1 and attn.qkv.out_features == (cfg.n_heads + 2) * cfg.head_dim
    assert attn.q_head_norm.eps == attn.k_head_norm.eps == 1e-5  # model.norm_eps
    plain = build_model_config(compose(["model=mha"], output_dir=tmp_path))
    assert Trunk(plain).blocks[0].attn.n_kv_heads == plain.n_heads and Trunk(plain).blocks[0].attn.q_head_norm is None


@pytest.mark.parametrize("value,message", [
    (3, "model.attn.n_kv_heads=3: must divide model.n_heads=8 (valid: 1, 2, 4, 8; null = n_heads)"),
    (16, "model.attn.n_kv_heads=16: must divide model.n_heads=8 (valid: 1, 2, 4, 8; null = n_heads)"),
])
def test_bad_n_kv_heads_is_a_one_line_error(value, message, tmp_path):
    from conftest import compose
    from ethos.checks import build_model_config
    from ethos.config import validate

    cfg = compose(["model=gqa", f"model.attn.n_kv_heads={value}"], output_dir=tmp_path)
    validate(cfg)  # a positive int: the type is right, the rule across keys is the constructor's
    with pytest.raises(ConfigError) as e:
        build_model_config(cfg)
    assert str(e.value) == message
    with pytest.raises(ConfigError, match="model.attn.n_kv_heads=0: must be an integer > 0 or null"):
        validate(compose(["model=gqa", "model.attn.n_kv_heads=0"], output_dir=tmp_path))
