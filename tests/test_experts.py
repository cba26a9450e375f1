import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ethos.errors import ConfigError
from ethos.kernels.latent_experts import expert_mix
from ethos.models.moe import PEER, LatentExperts

# Triton: on a GPU the kernel tests run directly. On CPU they need the interpreter, and triton
# freezes interpret-or-compile for its own library (tl.sum, ...) when triton is first imported, so
# they run in a subprocess started with TRITON_INTERPRET=1 (test_triton_kernels_in_interpreter).
# The interpreter costs ~10 ms per program (one per token and direction): keep them small.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
triton_direct = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                   reason="run by test_triton_kernels_in_interpreter in a subprocess")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(B=2, T=8, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T - 3:] = False  # trailing padding in the second sequence
    return x, mask


def _grads(model, x, mask, upstream):
    x = x.detach().clone().requires_grad_()
    y = model(x, mask)
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(y, [x] + [p for p in model.parameters()], upstream.to(y.dtype))
    return y, dict(zip(["x"] + names, grads))


def _loop_reference(m: LatentExperts, x, mask):
    """The design-doc formula, token by token, from the router's choices (float64)."""
    xf = x.reshape(-1, x.shape[-1])
    idx, s = m.router(xf, mask.reshape(-1))
    H = m.n_heads
    out = torch.zeros_like(xf)
    for t in range(len(xf)):
        if not mask.reshape(-1)[t]:
            continue
        for h in range(H):
            for j in range(m.top_k):
                g = F.gelu(m.latents[idx[t, h, j]] @ m.w1.t())
                u, v = g @ m.w_u, g @ m.w_v
                out[t] += s[t, h, j] * F.gelu(u @ xf[t]) * v / (H if m.head_reduce == "mean" else 1)
    return out.view_as(x)


# (N, H, k, d_hidden): table mode (T*H*k > N) and per-selection mode (T*H*k <= N); d_hidden not a
# power of two and > 64 so the kernels' block loops and tail masks are exercised; M = H*k odd.
CONFIGS = [(16, 2, 3, 80), (64**2, 3, 5, 96)]


@pytest.mark.parametrize("head_reduce", ["mean", "sum"])
def test_naive_matches_formula(head_reduce):
    torch.manual_seed(0)
    m = LatentExperts(24, 64, 2, 3, 8, d_latent=6, d_hidden=20, head_reduce=head_reduce, impl="naive").double()
    x, mask = _inputs(T=5)
    ref = _loop_reference(copy.deepcopy(m), x, mask)
    assert rel(m(x, mask), ref) < 1e-12


def _check_paths_match_naive(impl, N, H, k, d_hid, device="cpu"):
    torch.manual_seed(0)
    m = LatentExperts(24, N, H, k, 8, d_latent=12, d_hidden=d_hid, k_prime=k + 1, impl="naive")
    x, mask = _inputs(T=8)
    upstream = torch.randn(x.shape, dtype=torch.float64)
    ref = copy.deepcopy(m).double()
    y_ref, g_ref = _grads(ref, x, mask, upstream)
    fast = copy.deepcopy(m).float().to(device)
    fast.impl = impl
    y, g = _grads(fast, x.float().to(device), mask.to(device), upstream.to(device))
    y, g = y.cpu(), {n: v.cpu() for n, v in g.items()}
    assert (y[~mask] == 0).all() and (y_ref[~mask] == 0).all()
    assert rel(y, y_ref) < 1e-5
    assert set(g) == set(g_ref) and {"x", "latents", "w1", "w_u", "w_v", "router.query.weight",
                                     "router.sub_keys", "router.norm.weight"} <= set(g)
    for name in g:
        assert rel(g[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("N,H,k,d_hid", CONFIGS)
def test_torch_path_matches_naive_float64(N, H, k, d_hid):
    _check_paths_match_naive("torch", N, H, k, d_hid)


@triton_direct
@pytest.mark.parametrize("N,H,k,d_hid", CONFIGS)
def test_triton_path_matches_naive_float64(N, H, k, d_hid):
    _check_paths_match_naive("triton", N, H, k, d_hid, DEV)


def _check_expert_mix_untied_duplicates(impl, act, device="cpu"):
    """Separate U/V tables (PEER) and repeated experts within a token (atomics / segment sums)."""
    torch.manual_seed(0)
    T, M, N, D = 6, 7, 5, 70
    xp, U, V = (torch.randn(n, D, dtype=torch.float64, requires_grad=True) for n in (T, N, N))
    s = torch.rand(T, M, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, N, (T, M))
    idx[:, 1] = idx[:, 0]
    h = (U[idx] * xp[:, None]).sum(-1)
    y_ref = ((s * (F.gelu(h) if act == "gelu" else F.relu(h)))[..., None] * V[idx]).sum(1)
    up = torch.randn(T, D, dtype=torch.float64)
    g_ref = torch.autograd.grad(y_ref, (xp, U, V, s), up)
    args = [t.detach().float().to(device).requires_grad_() for t in (xp, U, V, s)]
    y = expert_mix(args[0], args[1], args[2], idx.to(device), args[3], act, impl)
    g = torch.autograd.grad(y, args, up.float().to(device))
    assert rel(y.cpu(), y_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a.cpu(), b) < 1e-5


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_torch_mix_untied_duplicates(act):
    _check_expert_mix_untied_duplicates("torch", act)


@triton_direct
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_triton_mix_untied_duplicates(act):
    _check_expert_mix_untied_duplicates("triton", act, DEV)


@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the Triton tests run directly in this process")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "triton_path or triton_mix"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout, \
        r.stdout[-4000:] + r.stderr[-2000:]


def test_padding_is_inert_and_stats_over_real_tokens():
    torch.manual_seed(0)
    m = LatentExperts(24, 64, 2, 3, 8, d_latent=6, d_hidden=20, impl="torch").double()
    x, mask = _inputs(T=6)
    x_pad = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))
    m_real = copy.deepcopy(m)
    y = m(x_pad, mask)
    y_real = m_real(x[mask][None])                                   # real tokens only, no mask
    assert (y[~mask] == 0).all()
    assert rel(y[mask], y_real[0]) < 1e-12
    for key in ("expert_usage", "unevenness", "router_entropy"):
        torch.testing.assert_close(m.stats[key], m_real.stats[key])
    torch.testing.assert_close(m.router.norm.running_var, m_real.router.norm.running_var)
    # padding gets no gradient and sends none
    xg = x_pad.clone().requires_grad_()
    m(xg, mask).sum().backward()
    assert (xg.grad[~mask] == 0).all()


def test_stats_values():
    torch.manual_seed(0)
    m = LatentExperts(24, 16, 2, 3, 8, d_latent=6, d_hidden=20, impl="torch").double()
    x, mask = _inputs(T=6)
    xf, mf = x.reshape(-1, 24), mask.reshape(-1)
    idx, s = copy.deepcopy(m.router)(xf, mf)
    m(x, mask)
    counts = torch.bincount(idx[mf].flatten(), minlength=16).double()
    p = counts / counts.sum()
    uneven = math.log(16) + (p[p > 0] * p[p > 0].log()).sum()
    assert m.stats["expert_usage"].item() == pytest.approx((counts > 0).double().mean().item())
    assert m.stats["unevenness"].item() == pytest.approx(uneven.item(), rel=1e-5)
    ent = -(s[mf] * s[mf].log()).sum(-1).mean()
    assert m.stats["router_entropy"].item() == pytest.approx(ent.item(), rel=1e-5)
    m.eval()
    before = m.stats
    m(x, mask)
    assert m.stats is before                                         # eval does not overwrite stats


def _peer_loop(p: PEER, x, mask):
    xf = x.reshape(-1, x.shape[-1])
    idx, s = p.router(xf, mask.reshape(-1))
    act = F.gelu if p.activation == "gelu" else F.relu
    out = torch.zeros_like(xf)
    for t in range(len(xf)):
        if mask.reshape(-1)[t]:
            for i, w in zip(idx[t].flatten(), s[t].flatten()):
                out[t] += w * act(p.down.weight[i] @ xf[t]) * p.up.weight[i]
    return out.view_as(x)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_peer_matches_formula_and_torch_path(activation):
    torch.manual_seed(0)
    p = PEER(24, 64, 2, 3, 8, activation=activation)
    x, mask = _inputs(T=5)
    ref = copy.deepcopy(p).double()
    assert rel(ref(x, mask), _peer_loop(copy.deepcopy(ref), x, mask)) < 1e-12
    upstream = torch.randn(x.shape, dtype=torch.float64)
    y_ref, g_ref = _grads(ref, x, mask, upstream)
    for impl in ("naive", "torch"):
        fast = copy.deepcopy(p)
        fast.impl = impl
        y, g = _grads(fast, x.float(), mask, upstream)
        assert rel(y, y_ref) < 1e-5 and (y[~mask] == 0).all()
        for name in g:
            assert rel(g[name], g_ref[name]) < 1e-5, (impl, name)
    assert set(fast.stats) == {"expert_usage", "unevenness", "router_entropy"}


def test_ethos_stores_at_least_6x_fewer_parameters_than_peer():
    small = {"d_model": 256, "num_experts": 128**2, "n_heads": 4, "top_k": 8, "d_query": 128}
    ethos = LatentExperts(**small, d_latent=64, d_hidden=256, impl="torch")
    peer = PEER(**small)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(peer) / count(ethos) >= 6


@pytest.mark.parametrize("kwargs,key", [
    ({"num_experts": 1000}, "model.ffn.num_experts=1000"),
    ({"k_prime": 2}, "model.ffn.k_prime=2"),
    ({"d_query": 9}, "model.ffn.d_query=9"),
])
def test_latent_validation(kwargs, key):
    args = {"d_model": 8, "num_experts": 64, "n_heads": 2, "top_k": 4, "d_query": 8, "d_latent": 4,
            "d_hidden": 8} | kwargs
    with pytest.raises(ConfigError) as e:
        LatentExperts(**args)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("model.ffn.impl=cuda", "model.ffn.impl='cuda': must be one of 'auto', 'naive', 'torch', 'triton'"),
    ("model.ffn.head_reduce=max", "model.ffn.head_reduce='max': must be one of 'mean', 'sum'"),
    ("model.ffn.d_latent=0", "model.ffn.d_latent=0: must be an integer > 0"),
])
def test_latent_config_types(override, key, tmp_path):
    from conftest import compose
    from ethos.config import validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["model=ethos", override], output_dir=tmp_path))
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_triton_without_gpu_is_a_config_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"^model\.ffn\.impl=triton: ") as e:
        LatentExperts(8, 64, 2, 4, 8, d_latent=4, d_hidden=8, impl="triton")
    assert "\n" not in str(e.value)
    # a model built in interpreter mode still refuses to launch once the interpreter is off
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    m = LatentExperts(8, 64, 2, 4, 8, d_latent=4, d_hidden=8, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"^model\.ffn\.impl=triton: "):
        m(torch.randn(1, 3, 8))


def test_auto_picks_torch_on_cpu():
    m = LatentExperts(8, 64, 2, 4, 8, d_latent=4, d_hidden=8)
    assert m.resolved_impl(torch.device("cpu")) == "torch"
    assert m.resolved_impl(torch.device("cuda")) == "triton"
