"""Attention score functions and the output gate (ethos/models/scores.py) against float64 references
written from their formulas, for MHA, MLA and MLA-o, forward and gradients; the identities between them;
the softmax path bit for bit against the former forward; training with each on the offline default."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention_mla import naive_rope, randomize_norms, rel

from ethos.errors import ConfigError
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.scores import Attend, allowed_keys, flex, null_key_sdpa, plain, record_attention, sdpa_mask

SCORES = ["softmax", "softmax1", "sink", "sigmoid", "relu"]
GATES = ["none", "head", "elementwise"]
VARIANTS = {
    "mha": (MHA, {}),
    "mla": (MLA, {"q_latent": 24, "kv_latent": 16, "v_head_dim": 12}),
    "mla_o": (MLAO, {"q_latent": None, "kv_latent": 16, "o_latent": 20, "rope_style": "decoupled"}),
}


def build(variant, score, gate, **kw):
    cls, extra = VARIANTS[variant]
    m = cls(48, 4, head_dim=16, rope_dims=8, score=score, gate=gate, **extra, **kw).double()
    randomize_norms(m)
    with torch.no_grad():
        if m.attend.sink is not None:
            m.attend.sink.normal_(0, 2.0)  # both signs, far from the zero init
    return m


# ---------------------------------------------------------------- the float64 reference
def ref_qkv(m, x):
    """q, k (B, T, H, d_qk), v (B, T, H, d_v) and the score scale, from the weights and the equations."""
    W = dict(m.named_parameters())
    B, T, _ = x.shape
    if isinstance(m, MHA):
        H, dh = m.n_heads, m.head_dim
        q, k, v = (x @ w.T for w in W["qkv.weight"].chunk(3))
        q, k, v = (t.view(B, T, H, dh) for t in (q, k, v))
        return naive_rope(q, m.rope_dims, False), naive_rope(k, m.rope_dims, False), v, dh ** -0.5
    H, dk, dv, dr = m.n_heads, m.d_k, m.d_v, m.d_r
    rms = lambda z, g: z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * g  # noqa: E731
    q_in, c_kv, k_r = (x @ W["qkv_a.weight"].T).split(m.split, dim=-1)
    q = (rms(q_in, W["q_norm.weight"]) @ W["q_b.weight"].T if m.q_latent else q_in).view(B, T, H, dk + dr)
    kv = (rms(c_kv, W["kv_norm.weight"]) @ W["kv_b.weight"].T).view(B, T, H, dk + dv)
    k, v = kv[..., :dk], kv[..., dk:]
    if dr:
        q = torch.cat((q[..., :dk], naive_rope(q[..., dk:], dr, False)), -1)
        k = torch.cat((k, naive_rope(k_r, dr, False)[:, :, None].expand(B, T, H, dr)), -1)
    else:
        q, k = naive_rope(q, m.rope_dims, False), naive_rope(k, m.rope_dims, False)
    return q, k, v, (dk + dr) ** -0.5


def ref_weights(s, allowed, score, sink=None, sigmoid_bias=None):
    """p (B, H, T, T) straight from docs/design.md §8; n = keys the query may attend to (at least 1)."""
    a = allowed.double()
    n = a.sum(-1, keepdim=True).clamp(min=1)
    e = torch.exp(s) * a
    if score == "softmax":
        return e / e.sum(-1, keepdim=True)
    if score == "softmax1":
        return e / (1 + e.sum(-1, keepdim=True))
    if score == "sink":
        return e / (torch.exp(sink).view(1, -1, 1, 1) + e.sum(-1, keepdim=True))
    if score == "sigmoid":
        b = -torch.log(n) if sigmoid_bias is None else sigmoid_bias
        return a / (1 + torch.exp(-(s + b)))
    return torch.clamp(s, min=0) * a / n  # relu


def reference(m, x, pad, causal):
    W = dict(m.named_parameters())
    B, T, _ = x.shape
    q, k, v, scale = ref_qkv(m, x)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = pad[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    p = ref_weights(s, allowed, m.attend.score, W.get("attend.sink"), m.attend.sigmoid_bias)
    o = torch.einsum("bhts,bshd->bthd", p, v)  # (B, T, H, d_v)
    if "attend.gate.weight" in W:  # o_h * sigmoid(x W_g): one gate per head or per channel
        g = torch.sigmoid(x @ W["attend.gate.weight"].T)
        o = o * g.view(B, T, m.n_heads, -1)
    o = o.reshape(B, T, -1)
    if isinstance(m, MLAO):
        return o @ W["o_a.weight"].T @ W["o_b.weight"].T
    return o @ W["out.weight"].T


def inputs(left_pad=False):
    torch.manual_seed(1)
    x = torch.randn(3, 9, 48, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(3, 9, dtype=torch.bool)
    pad[1, 6:] = False
    pad[2, 3:] = False
    if left_pad:  # causal: the first query of row 0 has no key at all
        pad[0, :2] = False
    return x, pad


def assert_matches_reference(m, x, pad, causal, tol=1e-10):
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for _, p in m.named_parameters()]
    y = m(x, attn_mask=pad, is_causal=causal)
    y_ref = reference(m, x, pad, causal)
    assert rel(y, y_ref) < tol
    grads = torch.autograd.grad((y * g).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *params])
    for name, a, b in zip(["x", *(n for n, _ in m.named_parameters())], grads, grads_ref):
        assert rel(a, b) < tol, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_score_and_gate_equal_float64_reference(variant, score, gate, causal):
    """The path the module takes on this device (SDPA, null-key SDPA, or plain), forward and the gradients
    of the input and of every parameter (sink logits and gate weights included)."""
    m = build(variant, score, gate)
    assert_matches_reference(m, *inputs(), causal)


@pytest.mark.parametrize("score", SCORES)
def test_plain_path_equals_reference(score):
    """The plain path (what record_attention runs for every score) against the same reference."""
    m = build("mla", score, "head")
    x, pad = inputs()
    seen = []
    with record_attention(m, lambda mod, p, allowed: seen.append(p)) as mods:
        assert mods == [m.attend]
        assert_matches_reference(m, x, pad, True)
    assert len(seen) == 1 and m.attend.probe is None  # recorded once, then back to the fast path
    # the recorded weights are the formula's
    q, k, v, scale = ref_qkv(m, x)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = allowed_keys(pad, True, 9, "cpu")
    want = ref_weights(s, allowed, score, m.attend.sink, None)
    assert rel(seen[0], want) < 1e-10


def test_sigmoid_bias_is_configurable():
    m = build("mha", "sigmoid", "none", sigmoid_bias=-1.5)
    assert_matches_reference(m, *inputs(), True)
    with pytest.raises(ConfigError, match=r"^model.attn.sigmoid_bias=-1.5: only score=sigmoid uses it"):
        MHA(48, 4, score="softmax", sigmoid_bias=-1.5)


# ---------------------------------------------------------------- identities
def qkv(T=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, T, 8, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_softmax1_is_softmax_with_an_appended_zero_logit(causal, padded):
    q, k, v = qkv()
    pad = torch.ones(2, 9, dtype=torch.bool)
    if padded:
        pad[1, 5:] = False
    mask = pad if padded else None
    allowed = allowed_keys(mask, causal, 9, "cpu")
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.cat((s, torch.zeros(2, 3, 9, 1, dtype=s.dtype)), -1).softmax(-1)[..., :-1]
    want = p @ v
    fast = null_key_sdpa(q, k, v, mask, causal, 8 ** -0.5, None)
    slow = plain(q, k, v, allowed, 8 ** -0.5, "softmax1")[0]
    assert rel(fast, want) < 1e-12 and rel(slow, want) < 1e-12
    assert (p.sum(-1) < 1).all()  # some mass always goes to nothing


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dv", [8, 5])  # equal head dims (padded for the flash kernels) or not
def test_sink_fast_path_equals_formula(causal, padded, dv):
    """The SDPA path of sink (softmax1 + the null weight r, rescaled) against the formula, every mask
    layout (the causal dummy-query path included), forward and the gradient of the logits."""
    q, k, v = qkv()
    v = v[..., :dv]
    pad = torch.ones(2, 9, dtype=torch.bool)
    if padded:
        pad[1, 5:] = False
        pad[0, :2] = False  # with causal: rows with no key
    mask = pad if padded else None
    sink = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64, requires_grad=True)
    allowed = allowed_keys(mask, causal, 9, "cpu")
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    a = allowed if allowed is not None else torch.ones(9, 9, dtype=torch.bool)
    want = ref_weights(s, a, "sink", sink) @ v
    got = null_key_sdpa(q, k, v, mask, causal, 8 ** -0.5, sink)
    assert rel(got, want) < 1e-12
    g = torch.randn_like(want)
    assert rel(*(torch.autograd.grad((o * g).sum(), sink)[0] for o in (got, want))) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_sink_with_logit_at_minus_infinity_is_softmax(causal):
    torch.manual_seed(0)
    x, pad = inputs()
    x = x.detach().float()
    soft = MHA(48, 4, rope_dims=8)
    sink = MHA(48, 4, rope_dims=8, score="sink")
    sink.load_state_dict(soft.state_dict() | {"attend.sink": torch.full((4,), float("-inf"))})
    torch.testing.assert_close(sink(x, attn_mask=pad, is_causal=causal), soft(x, attn_mask=pad, is_causal=causal),
                               rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        sink.attend.sink.fill_(-40.0)  # exp(-40) next to sums of order 1: softmax to float precision
    torch.testing.assert_close(sink(x, attn_mask=pad, is_causal=causal), soft(x, attn_mask=pad, is_causal=causal),
                               rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        sink.attend.sink.fill_(0.0)  # a zero logit is softmax1
    one = MHA(48, 4, rope_dims=8, score="softmax1")
    one.load_state_dict(soft.state_dict())
    torch.testing.assert_close(sink(x, attn_mask=pad, is_causal=causal), one(x, attn_mask=pad, is_causal=causal),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("score", ["sigmoid", "relu", "softmax1", "sink"])
@pytest.mark.parametrize("recorded", [False, True])
def test_a_row_with_no_key_gives_zero_not_nan(score, recorded):
    """Left padding + causal: the first query of row 0 may attend to nothing. softmax leaves that row
    undefined (SDPA's business); these scores define it as 0 output, with finite gradients."""
    m = build("mla", score, "none")
    x, pad = inputs(left_pad=True)
    seen = []
    probe = (lambda mod, p, allowed: seen.append(p)) if recorded else None
    with record_attention(m, probe) if recorded else torch.enable_grad():
        y = m(x, attn_mask=pad, is_causal=True)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0, 0], torch.zeros(48, dtype=y.dtype))
    grad, = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(grad).all()
    assert_matches_reference(m, x, pad, True)
    if recorded:
        assert torch.equal(seen[0][0, :, 0], torch.zeros_like(seen[0][0, :, 0]))


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("score", ["sigmoid", "relu"])
def test_flex_formulation_equals_plain(score, causal, padded):
    """The FlexAttention path (chosen on CUDA) run eagerly here, forward only (no CPU backward in torch
    2.14): the log-weight score_mod times exp(lse) gives the unnormalised sums of the plain path."""
    q, k, v = qkv(T=16, dtype=torch.float32)
    pad = torch.ones(2, 16, dtype=torch.bool)
    if padded:
        pad[1, 10:] = False
        pad[0, :3] = False  # with causal: rows with no key
    mask = pad if padded else None
    with torch.no_grad():
        want = plain(q, k, v, allowed_keys(mask, causal, 16, "cpu"), 8 ** -0.5, score)[0]
        got = flex(q, k, v, mask, causal, 8 ** -0.5, score, compiled=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- softmax: bit for bit as before
def former_mha(m, x, attn_mask, is_causal):
    """MHA.forward as it was before score functions (copied from git history)."""
    from ethos.models.rope import apply_rope, rope_tables

    B, T, _ = x.shape
    q, k, v = m.qkv(x).view(B, T, 3, m.n_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    rope = rope_tables(m.rope_dims, T, 10000.0, q.dtype, q.device)
    q, k = apply_rope(q, rope, False), apply_rope(k, rope, False)
    mask, causal = sdpa_mask(attn_mask, is_causal, T, x.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=0.0)
    return m.out(o.transpose(1, 2).reshape(B, T, -1))


def former_mla_sdpa(m, q, k, v, attn_mask, is_causal):
    """The SDPA call MLA.forward made before score functions, and its reshape."""
    B, H, T, _ = q.shape
    mask, causal = sdpa_mask(attn_mask, is_causal, T, q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=m.scale, dropout_p=0.0)
    return o.transpose(1, 2).reshape(B, T, H * m.d_v)


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_softmax_path_is_bit_identical(causal, padded):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 48, requires_grad=True)
    pad = torch.ones(3, 11, dtype=torch.bool)
    pad[1, 7:] = False
    mask = pad if padded else None
    m = MHA(48, 4, rope_dims=8)
    assert not list(m.attend.parameters())  # no new parameters, the same state dict
    y, y_old = m(x, attn_mask=mask, is_causal=causal), former_mha(m, x, mask, causal)
    assert torch.equal(y, y_old)
    g, g_old = (torch.autograd.grad(t.sum(), [x, *m.parameters()]) for t in (y, y_old))
    assert all(torch.equal(a, b) for a, b in zip(g, g_old))
    # MLA's core: the Attend call against the former SDPA call on the same q, k, v
    mla = MLA(48, 4, head_dim=16, rope_dims=8, q_latent=24, kv_latent=16, v_head_dim=12)
    q, k, v = torch.randn(3, 4, 11, 16), torch.randn(3, 4, 11, 16), torch.randn(3, 4, 11, 12)
    got = mla.attend(x, q, k, v, mask, causal, mla.scale, 0.0)
    assert torch.equal(got, former_mla_sdpa(mla, q, k, v, mask, causal))


def test_closed_forms_count_gates_and_sinks():
    for cls, kw in VARIANTS.values():
        for score in SCORES:
            for gate in GATES:
                with torch.device("meta"):
                    m = cls(48, 4, head_dim=16, rope_dims=8, score=score, gate=gate, bias=True, **kw)
                assert cls.param_count(48, 4, head_dim=16, rope_dims=8, score=score, gate=gate, bias=True, **kw) \
                    == sum(p.numel() for p in m.parameters()), (cls, score, gate)
    d_v = 16
    assert Attend.param_count(48, 4, d_v, "sink", "elementwise") == 4 + 48 * 4 * d_v


# ---------------------------------------------------------------- training on the offline default
@pytest.mark.slow
@pytest.mark.parametrize("score", SCORES)
def test_short_run_trains_and_logs_artifacts(score, cache_dir, tmp_path):
    """Each score function (sink and sigmoid with a gate, to train those parameters too) learns on the
    offline corpus, and the artifact callback logs its metrics for every layer at every validation."""
    from test_train import metrics

    from conftest import compose
    from ethos.study import train

    gate = {"sink": "head", "sigmoid": "elementwise"}.get(score, "none")
    cfg = compose(["debug=tiny", "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6",
                   "data.batch_size=8", "optim.lr=3e-3", f"model.attn.score={score}", f"model.attn.gate={gate}"],
                  output_dir=tmp_path)
    train(cfg)
    m = metrics(tmp_path)
    val = [v for _, v in m["val/loss"]]
    assert len(val) == 3 and val[2] < val[1] < val[0] - 0.3, val
    for layer in range(2):
        keys = ["first_mass", "sep_mass", "entropy", "max_activation"] + (["null_mass"] if score in ("softmax1", "sink")
                                                                          else [])
        for k in keys:
            got = m.get(f"artifacts/layer{layer}/{k}", [])
            assert [s for s, _ in got] == [s for s, _ in m["val/loss"]], (k, got)  # at every validation
            assert all(math.isfinite(v) for _, v in got), (k, got)
        assert "artifacts/layer{layer}/null_mass" not in m or score in ("softmax1", "sink")
        assert all(0 <= v <= 1 for _, v in m[f"artifacts/layer{layer}/first_mass"])
        assert all(v > 0 for _, v in m[f"artifacts/layer{layer}/max_activation"])


# ---------------------------------------------------------------- config and backbones
def test_config_key_reaches_every_layer_and_bad_values_fail(tmp_path):
    from conftest import compose
    from ethos.checks import build_model_config
    from ethos.config import validate
    from ethos.models.blocks import Trunk

    cfg = build_model_config(compose(["model=mla", "model.num_dense_layers=1", "model.attn.score=sink",
                                      "model.attn.gate=head", "debug=tiny"], output_dir=tmp_path))
    with torch.device("meta"):
        trunk = Trunk(cfg)
    assert [type(b.attn) for b in trunk.blocks] == [MHA, MLA]  # the dense MHA layer follows model.attn too
    assert all(b.attn.attend.score == "sink" and b.attn.attend.gate.out_features == 4 for b in trunk.blocks)
    with pytest.raises(ConfigError) as e:
        validate(compose(["model.attn.score=softmax2"], output_dir=tmp_path))
    assert str(e.value) == ("model.attn.score='softmax2': must be one of 'softmax', 'softmax1', 'sink', 'sigmoid', "
                            "'relu'")
    with pytest.raises(ConfigError, match=r"^model.attn.gate='heads': must be one of 'none', 'head', 'elementwise'$"):
        validate(compose(["model=mla_o", "model.attn.gate=heads"], output_dir=tmp_path))


def test_artifact_metrics_of_a_vit_equal_their_definitions():
    """The callback's reductions on the ViT (image batches, cls at position 0, no padding) against the
    weights recorded independently, and the residual-stream peak against the blocks' outputs."""
    from functools import partial

    from ethos.callbacks.attention_stats import measure
    from ethos.models.blocks import Block
    from ethos.models.config import ModelConfig
    from ethos.models.ffn import SwiGLU
    from ethos.models.vit import ViT

    torch.manual_seed(0)
    cfg = ModelConfig(attn=partial(MLAO, q_latent=16, kv_latent=8, o_latent=12, score="sink"),
                      ffn=partial(SwiGLU, d_ff=64), d_model=32, n_layers=2, n_heads=4, rope_dims=4)
    task = torch.nn.Module()
    task.model = ViT(cfg, num_classes=3, img_size=16, patch_size=4).eval()
    with torch.no_grad():
        task.model.trunk.blocks[0].attn.attend.sink.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    task.device = torch.device("cpu")
    images = torch.randn(2, 3, 16, 16)
    got = measure(task, {"image": images, "label": torch.zeros(2)}, sep_id=None)
    weights, outs = [], []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in task.model.modules()
             if isinstance(b, Block)]
    with torch.no_grad(), record_attention(task.model, lambda mod, p, allowed: weights.append(p)):
        task.model(images)
    for h in hooks:
        h.remove()
    for i in range(2):
        p = weights[i]  # both rows at once here: means over rows, heads and queries are the same
        assert got[f"artifacts/layer{i}/first_mass"] == pytest.approx(p[..., 0].mean().item(), rel=1e-5)
        assert got[f"artifacts/layer{i}/null_mass"] == pytest.approx((1 - p.sum(-1)).mean().item(), rel=1e-5)
        r = p / p.sum(-1, keepdim=True)
        assert got[f"artifacts/layer{i}/entropy"] == pytest.approx(-(r * r.log()).sum(-1).mean().item(), rel=1e-5)
        assert got[f"artifacts/layer{i}/max_activation"] == pytest.approx(outs[i].abs().max().item(), rel=1e-6)
        assert f"artifacts/layer{i}/sep_mass" not in got  # images have no separators
    assert got["artifacts/layer0/null_mass"] != pytest.approx(got["artifacts/layer1/null_mass"])
