"""Logged parameter counts: per layer and per model, against closed forms."""

from conftest import compose
from ethos.checks import build_model_config
from ethos.config import instantiate
from ethos.models.attention import MHA, MLA
from ethos.tasks.mlm import MaskedLM


def test_per_layer_counts_add_up_and_match_closed_forms(tmp_path):
    cfg = compose(["model=ethos", "model.ffn.num_experts=1024", "model.ffn.d_query=32"], output_dir=tmp_path)
    m = build_model_config(cfg)
    task = MaskedLM(m, instantiate(cfg.optim), vocab_size=1000)
    counts = task.param_counts()
    d, V, L = m.d_model, 1000, m.n_layers
    layers = sum(counts[f"params/layer{i}/total"] for i in range(L))
    assert counts["params/total"] == layers + V * d + V + d  # + tied embedding, MLM bias, final norm
    assert counts["params/non_embedding"] == counts["params/total"] - V * d
    kw = {k: v for k, v in cfg.model.attn.items() if not k.startswith("_") and k != "norm_eps"}
    for i in range(L):
        attn = counts[f"params/layer{i}/attention"]
        assert attn == MLA.param_count(d, m.n_heads, m.head_dim, m.rope_dims, **kw), i
    dense, sparse = counts["params/layer0/total"], counts["params/layer1/total"]
    f = cfg.model.ffn
    n_sub = int(f.num_experts ** 0.5)
    expert_ffn = (f.num_experts * f.d_latent + f.d_hidden * f.d_latent + 2 * f.d_hidden * d  # Z, W1, W_u, W_v
                  + d * f.n_heads * f.d_query + 2 * f.n_heads * f.d_query  # query proj, BatchNorm
                  + f.n_heads * 2 * n_sub * (f.d_query // 2))  # sub-keys
    assert sparse - dense == expert_ffn - 3 * d * cfg.model.dense_ffn.d_ff


def test_gqa_and_qk_norm_counts_match_closed_form(tmp_path):
    """GQA's narrower W_k, W_v and the two QK-norm gains, per layer, against MHA.param_count read from the config."""
    cfg = compose(["model=gqa", "model.attn.n_kv_heads=1", "model.attn.qk_norm=true"], output_dir=tmp_path)
    m = build_model_config(cfg)
    counts = MaskedLM(m, instantiate(cfg.optim), vocab_size=1000).param_counts()
    kw = {k: v for k, v in cfg.model.attn.items() if not k.startswith("_") and k != "norm_eps"}
    d, H, d_h = m.d_model, m.n_heads, m.head_dim
    per_layer = MHA.param_count(d, H, d_h, m.rope_dims, **kw)
    assert per_layer == 2 * d * H * d_h + 2 * d * 1 * d_h + 2 * d_h  # W_q, W_O; one W_k, W_v head; two gains
    assert [counts[f"params/layer{i}/attention"] for i in range(m.n_layers)] == [per_layer] * m.n_layers


def test_active_parameters_of_the_expert_layers():
    """params/active: what one token uses. PEER: the whole router and the u_i, v_i of its H k experts; ETHOS: the
    router, the shared generator and the z_i of its H k selections; a dense FFN: all of it."""
    import torch

    from ethos.models.moe import PEER, LatentExperts

    d, N, H, k, dq = 48, 256, 2, 4, 16
    with torch.device("meta"):
        peer = PEER(d, num_experts=N, n_heads=H, top_k=k, d_query=dq)
        ethos = LatentExperts(d, num_experts=N, n_heads=H, top_k=k, d_query=dq, d_latent=8, d_hidden=24)
    router = d * H * dq + 2 * H * dq + H * 2 * 16 * (dq // 2)  # query, BatchNorm, sub-keys (sqrt(N) = 16)
    assert peer.active_params() == router + H * k * 2 * d
    assert ethos.active_params() == router + 24 * 8 + 2 * 24 * d + H * k * 8
