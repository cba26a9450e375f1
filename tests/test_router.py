import copy
import math

import pytest
import torch

from ethos.errors import ConfigError
from ethos.models.moe.router import ProductKeyRouter, routing_stats


def _router(d=24, N=64, H=3, k=5, dq=8, kp=None, seed=0):
    torch.manual_seed(seed)
    r = ProductKeyRouter(d, N, H, k, dq, kp).double()
    with torch.no_grad():  # non-trivial BatchNorm affine so it is really exercised
        r.norm.weight.uniform_(0.5, 1.5)
        r.norm.bias.normal_(0, 0.3)
    return r


def _brute_force(r, x, mask=None):
    """Top-k over all N full keys [C1[i1]; C2[i2]] with an explicitly computed masked BatchNorm."""
    q = r.query(x)
    w = torch.ones(len(x), dtype=x.dtype) if mask is None else mask.to(x.dtype)
    mean = (q * w[:, None]).sum(0) / w.sum()
    var = ((q - mean) ** 2 * w[:, None]).sum(0) / w.sum()
    q = (q - mean) / torch.sqrt(var + r.norm.eps) * r.norm.weight + r.norm.bias
    q = q.view(len(x), r.n_heads, r.d_query)
    n = r.n_sub
    c1, c2 = r.sub_keys[:, 0], r.sub_keys[:, 1]                     # (H, n, dq/2)
    keys = torch.cat([c1[:, :, None].expand(-1, n, n, -1), c2[:, None].expand(-1, n, n, -1)], -1)
    scores = torch.einsum("thd,hnd->thn", q, keys.reshape(r.n_heads, n * n, -1))
    best, idx = scores.topk(r.top_k, dim=-1)
    return idx, torch.softmax(best, -1), mean, var


@pytest.mark.parametrize("N,H,k,kp", [(64, 3, 5, None), (64, 2, 4, 7), (256, 4, 16, 16), (100, 1, 1, 3)])
def test_router_equals_brute_force(N, H, k, kp):
    r = _router(N=N, H=H, k=k, kp=kp)
    x = torch.randn(40, 24, dtype=torch.float64)
    idx, s = r(x)
    bidx, bs, _, _ = _brute_force(r, x)
    assert idx.dtype == torch.int64 and idx.shape == (40, H, k)
    assert torch.equal(idx, bidx)
    torch.testing.assert_close(s, bs, rtol=1e-12, atol=1e-12)


def test_router_batchnorm_ignores_padding():
    r = _router()
    x = torch.randn(30, 24, dtype=torch.float64)
    mask = torch.rand(30) > 0.3
    x_pad = torch.where(mask[:, None], x, 1e3 * torch.randn_like(x))  # garbage in padding rows
    r_real = copy.deepcopy(r)
    idx, s = r(x_pad, mask)
    bidx, bs, mean, var = _brute_force(r, x_pad, mask)
    assert torch.equal(idx[mask], bidx[mask])
    torch.testing.assert_close(s[mask], bs[mask], rtol=1e-12, atol=1e-12)
    # identical to routing the real tokens alone, including the running statistics
    idx_r, s_r = r_real(x[mask])
    assert torch.equal(idx[mask], idx_r)
    torch.testing.assert_close(s[mask], s_r)
    torch.testing.assert_close(r.norm.running_mean, r_real.norm.running_mean)
    torch.testing.assert_close(r.norm.running_var, r_real.norm.running_var)
    n = int(mask.sum())
    torch.testing.assert_close(r.norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(r.norm.running_var, 0.9 + 0.1 * var * n / (n - 1))
    # eval mode uses the running statistics
    r.eval()
    q = (r.query(x) - r.norm.running_mean) / torch.sqrt(r.norm.running_var + r.norm.eps)
    torch.testing.assert_close(r.norm(r.query(x)), q * r.norm.weight + r.norm.bias)


def test_router_gradients_gradcheck():
    r = _router(d=6, N=16, H=2, k=3, dq=4, kp=4)
    x = torch.randn(10, 6, dtype=torch.float64)
    params = [r.query.weight, r.sub_keys, r.norm.weight, r.norm.bias]

    def scores(qw, keys, bw, bb):
        return torch.func.functional_call(
            r, {"query.weight": qw, "sub_keys": keys, "norm.weight": bw, "norm.bias": bb}, (x,)
        )[1]

    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(scores, inputs, eps=1e-6, atol=1e-6)


def test_routing_stats_match_direct_computation():
    N = 16
    idx = torch.randint(0, N, (12, 2, 3))
    s = torch.softmax(torch.randn(12, 2, 3), -1)
    mask = torch.rand(12) > 0.25
    st = routing_stats(idx, s, N, mask)
    sel = idx[mask].flatten().tolist()
    counts = [sel.count(i) for i in range(N)]
    p = [c / len(sel) for c in counts]
    assert st["expert_usage"].item() == pytest.approx(sum(c > 0 for c in counts) / N)
    assert st["unevenness"].item() == pytest.approx(math.log(N) + sum(q * math.log(q) for q in p if q > 0),
                                                    rel=1e-5)
    ent = -(s[mask] * s[mask].log()).sum(-1).mean()
    assert st["router_entropy"].item() == pytest.approx(ent.item(), rel=1e-5)
    assert all(not v.requires_grad for v in st.values())


@pytest.mark.parametrize("kwargs,key", [
    ({"num_experts": 1000}, "model.ffn.num_experts=1000"),
    ({"k_prime": 3}, "model.ffn.k_prime=3"),
    ({"d_query": 7}, "model.ffn.d_query=7"),
    ({"top_k": 9, "k_prime": 9}, "model.ffn.k_prime=9"),   # k' > sqrt(N) = 8
])
def test_router_validation(kwargs, key):
    args = {"d_model": 8, "num_experts": 64, "n_heads": 2, "top_k": 4, "d_query": 8} | kwargs
    with pytest.raises(ConfigError) as e:
        ProductKeyRouter(**args)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)
