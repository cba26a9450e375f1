"""The standard MoE FFN (ethos/models/moe/routed.py) against a float64 token-by-token brute force and against HF
transformers' DeepseekV3MoE with copied weights; deterministic ties; balance by the bias; closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from ethos.models.moe import MoE

D, E, K, F_ = 24, 8, 3, 16


def brute_force(m: MoE, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Every token through its chosen experts one at a time, in float64, from the module's own weights."""
    xf = x.reshape(-1, x.shape[-1])
    real = torch.ones(xf.shape[0], dtype=torch.bool) if pad is None else pad.reshape(-1)
    out = []
    for t in range(xf.shape[0]):
        logits = xf[t] @ m.gate.weight.T
        s = logits.sigmoid() if m.score == "sigmoid" else logits.softmax(-1)
        choice = s.detach() + m.bias
        chosen = sorted(range(m.num_experts), key=lambda i: (-float(choice[i]), i))[:m.top_k]  # ties: lower index
        g = s[chosen]
        if m.norm_topk:
            g = g / g.sum()
        y = torch.zeros_like(xf[t])
        for gi, i in zip(g * m.route_scale, chosen):
            gate, up = (xf[t] @ m.w13[i]).chunk(2)
            y = y + gi * ((F.silu(gate) * up) @ m.w2[i])
        y = y * real[t]
        if m.shared is not None:
            gate, up = m.shared.w13(xf[t]).chunk(2)
            y = y + m.shared.w2(F.silu(gate) * up)
        out.append(y)
    return torch.stack(out).view_as(x)


def moe(score="sigmoid", n_shared=2, impl="padded", seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    m = MoE(D, num_experts=E, top_k=K, d_expert=F_, n_shared=n_shared, score=score,
            norm_topk=score == "sigmoid", impl=impl, **kw)
    with torch.no_grad():  # O(1) scores and a nonzero bias, so that the bias really changes the choice
        m.gate.weight.normal_(0, D**-0.5)
        m.bias.copy_(torch.randn(E) * 0.1)
        m.w2.normal_(0, 0.1)
    return m


def grads(m: MoE, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> dict:
    names = ["x", *(n for n, _ in m.named_parameters())]
    got = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    return dict(zip(names, got))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_brute_force_in_float64(score, n_shared, padded):
    m = moe(score, n_shared).double().train()
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(2, 7, dtype=torch.bool)
    if padded:
        pad[1, 4:] = False
    w = torch.randn(2, 7, D, dtype=torch.float64)
    y = m(x, pad if padded else None)
    want = brute_force(m, x, pad if padded else None)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-14)
    got, ref = grads(m, x, y, w), grads(m, x, want, w)
    assert set(got) >= {"x", "gate.weight", "w13", "w2"}
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-13, msg=name)
    if padded:  # padding: no output from the routed experts and no gradient through them
        assert got["x"][1, 4:].abs().sum() == 0 or n_shared  # the shared experts see every position
        assert m.counts.sum() == K * int(pad.sum())


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_gemm_equals_the_padded_batch(dtype, tol):
    """The two compute paths agree, outputs and every gradient (the CUDA path, run on CPU)."""
    m = moe(impl="padded")
    x = torch.randn(3, 16, D, requires_grad=True)
    w = torch.randn(3, 16, D)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = m(x)
        m.impl = "grouped"
        y2 = m(x)
    torch.testing.assert_close(y2.float(), y.float(), rtol=tol, atol=tol)
    g, g2 = grads(m, x, y.float(), w), grads(m, x, y2.float(), w)
    for name in g:
        torch.testing.assert_close(g2[name], g[name], rtol=tol, atol=tol, msg=name)


def test_the_compiler_s_custom_op_equals_the_eager_path():
    """Under torch.compile the padded path runs as ethos::moe_padded (its backward written out): the same values
    and gradients, and registrations torch's opcheck accepts."""
    from ethos.models.moe.routed import padded_experts, padded_experts_op

    torch.manual_seed(0)
    idx = torch.rand(13, E).argsort(-1)[:, :K]  # distinct experts per token, uneven loads
    x, w13, w2 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((13, D), (E, D, 2 * F_),
                                                                                        (E, F_, D)))
    g = torch.randn(13, K, D, dtype=torch.float64)
    want = padded_experts(x, idx, w13, w2)
    got = padded_experts_op(x, idx, w13, w2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got, (x, w13, w2), g), torch.autograd.grad(want, (x, w13, w2), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.library.opcheck(padded_experts_op, (x, idx, w13, w2))


def test_ties_go_to_the_lower_expert_index():
    """Experts with identical router rows score alike for every token: the lower index wins, always."""
    m = moe(n_shared=0).double()
    with torch.no_grad():
        m.bias.zero_()
        m.gate.weight[5] = m.gate.weight[2]
        m.gate.weight[7] = m.gate.weight[2]
    x = torch.randn(4, 9, D, dtype=torch.float64)
    idx = m.route(x.reshape(-1, D))[0]
    has2 = (idx == 2).any(-1)
    assert has2.any()
    # 5 is chosen only where 2 is, and 7 only where 5 is
    assert not ((idx == 5).any(-1) & ~has2).any() and not ((idx == 7).any(-1) & ~(idx == 5).any(-1)).any()
    torch.testing.assert_close(m(x), brute_force(m, x), rtol=1e-12, atol=1e-14)


def test_equals_hf_deepseek_v3_moe_with_copied_weights():
    """transformers' DeepseekV3MoE (sigmoid scores, bias-corrected choice, normalised top-k, routed scaling, one
    group) on our weights: the same layer."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E, num_experts_per_tok=K,
                           n_shared_experts=2, n_group=1, topk_group=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, hidden_act="silu")
    hf = DeepseekV3MoE(cfg).eval()
    m = moe(route_scale=2.5).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(m.gate.weight)
        hf.gate.e_score_correction_bias.copy_(m.bias)
        hf.experts.gate_up_proj.copy_(m.w13.transpose(1, 2))
        hf.experts.down_proj.copy_(m.w2.transpose(1, 2))
        f = 2 * F_
        hf.shared_experts.gate_proj.weight.copy_(m.shared.w13.weight[:f])
        hf.shared_experts.up_proj.weight.copy_(m.shared.w13.weight[f:])
        hf.shared_experts.down_proj.weight.copy_(m.shared.w2.weight)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x), rtol=1e-5, atol=1e-6)


def test_the_bias_chooses_but_gets_no_gradient():
    m = moe().train()
    m.bias.requires_grad_(True)  # were it reachable, autograd would give it a gradient
    x = torch.randn(2, 6, D)
    m(x).square().sum().backward()
    assert m.bias.grad is None
    assert "bias" not in dict(m.named_parameters()) and "bias" in m.state_dict()
    with torch.no_grad():  # yet it decides: a large bias on one expert puts it in every token's top-k
        m.bias.requires_grad_(False)
        m.bias.zero_()
        m.bias[4] = 10.0
        assert (m.route(x.reshape(-1, D))[0] == 4).any(-1).all()


def skewed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens whose router scores favour experts 0-2: a shared direction those rows of W_g align with."""
    return torch.randn(n, D, generator=gen) * 0.5 + torch.linspace(1, 2, D)


def test_the_bias_update_balances_a_skewed_router():
    """V3's update b_i += gamma * sign(mean - load_i) on a router skewed toward 3 of 8 experts: the largest load
    falls to within 1.5x of uniform in a bounded number of steps, and stays there."""
    m = moe(n_shared=0, bias_rate=0.005).train()
    with torch.no_grad():
        m.bias.zero_()
        m.gate.weight[:3] += 0.05  # experts 0-2 score high for every token of `skewed`
    gen = torch.Generator().manual_seed(0)
    loads = []
    for _ in range(200):
        m(skewed(256, gen)[None])
        loads.append(float(m.counts.max() / m.counts.mean()))
        m.accumulate()
        m.update_bias()
    assert loads[0] > 2.0  # skewed indeed: experts 0-2 take nearly every token's three slots
    first = next(i for i, v in enumerate(loads) if v <= 1.5)
    assert first <= 150, loads[::10]  # 61 to 85 steps over seeds 0-2
    assert max(loads[-50:]) <= 1.5, loads[-50:]  # then it stays balanced: 1.29 to 1.40 over seeds 0-2
    assert float(m.bias[:3].mean()) < float(m.bias[3:].mean())  # the favoured experts were pushed down


def test_bias_update_sums_the_micro_batches_of_a_step():
    m = moe(n_shared=0, bias_rate=0.5).train()
    with torch.no_grad():
        m.bias.zero_()
    x = torch.randn(1, 10, D)
    m(x[:, :5])
    first = m.counts.clone()
    m.accumulate()
    m(x[:, 5:])
    second = m.counts.clone()
    m.accumulate()
    m.update_bias()
    load = first + second
    torch.testing.assert_close(m.bias, 0.5 * torch.sign(load.mean() - load))
    assert m.pending is None


def test_sequence_wise_aux_loss_equals_its_formula():
    """DeepSeek-V3 eq. 17-20 by hand, per sequence, over real tokens, and its gradient reaches the router."""
    m = moe(n_shared=0, aux_loss=0.01).double().train()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    pad = torch.ones(3, 5, dtype=torch.bool)
    pad[2, 3:] = False
    m(x, pad)
    want = []
    for b in range(3):
        xs = x[b][pad[b]]
        s = (xs @ m.gate.weight.T).sigmoid()
        idx = m.route(xs)[0]
        f = torch.zeros(E, dtype=torch.float64)
        for row in idx:
            f[row] += 1
        f = f * E / (K * len(xs))
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        want.append((f * P).sum())
    torch.testing.assert_close(m.aux_loss, 0.01 * torch.stack(want).mean())
    m.aux_loss.backward()
    assert m.gate.weight.grad.abs().sum() > 0


def test_stats_report_usage_and_load():
    m = moe(n_shared=0).train()
    with torch.no_grad():
        m.bias.zero_()
        m.bias[:K] = 10.0  # every token goes to experts 0..K-1
    m(torch.randn(2, 4, D))
    assert float(m.stats["expert_usage"]) == pytest.approx(K / E)
    assert float(m.stats["max_load"]) == pytest.approx(E / K)  # K experts carry all the load
    assert float(m.stats["bias_range"]) == pytest.approx(10.0)


@pytest.mark.parametrize("n_shared", [0, 2])
def test_closed_forms_equal_the_module(n_shared):
    m = moe(n_shared=n_shared)
    kw = dict(num_experts=E, top_k=K, d_expert=F_, n_shared=n_shared)
    assert MoE.param_count(D, **kw) == sum(p.numel() for p in m.parameters())
    # active: the router, K of the E routed experts, the shared ones
    expert = 3 * D * F_
    assert m.active_params() == MoE.active_param_count(D, **kw) == D * E + expert * (K + n_shared)
    assert MoE.param_count(D, **kw) - m.active_params() == expert * (E - K)


def test_active_params_in_the_model_counts(tmp_path):
    """params/active of a whole model: the total less the unused experts of every expert layer."""
    from conftest import compose
    from ethos.checks import build_model_config
    from ethos.config import instantiate
    from ethos.tasks.mlm import MaskedLM

    cfg = compose(["model=moe", f"model.ffn.num_experts={E}", f"model.ffn.top_k={K}"], output_dir=tmp_path)
    counts = MaskedLM(build_model_config(cfg), instantiate(cfg.optim), vocab_size=100).param_counts()
    f = cfg.model.ffn
    assert counts["params/total"] - counts["params/active"] == cfg.model.n_layers * 3 * 256 * f.d_expert * (E - K)
    dense = compose([], output_dir=tmp_path)
    dense_counts = MaskedLM(build_model_config(dense), instantiate(dense.optim), vocab_size=100).param_counts()
    assert dense_counts["params/active"] == dense_counts["params/total"]


def test_init_follows_the_linear_scheme(tmp_path):
    """Trunk initialises the expert tables as init_linear does Linear layers: N(0, 0.02), w2 depth-scaled, or 0
    under model.zero_init."""
    from ethos.models.blocks import init_linear

    m = MoE(256, num_experts=16, top_k=2, d_expert=128)
    init_linear(m, n_layers=8)
    assert float(m.w13.std()) == pytest.approx(0.02, rel=0.02)
    assert float(m.w2.std()) == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    init_linear(m, n_layers=8, zero_out=True)
    assert m.w2.abs().sum() == 0 and m.w13.abs().sum() > 0
