"""The rank callback (ethos/callbacks/ranks.py): what a short training run logs equals the effective ranks of
the matrices built here straight from its checkpoint's state_dict (no analysis code), for MHA and MLA; planted
low-rank W_O, W_VO_h and W_QK_h come out with exactly the planted rank."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch

TAUS = (0.99, 0.999)


def erank(s: torch.Tensor, tau: float) -> int:
    """Smallest r whose top-r singular values hold a fraction tau of the energy (written from the definition)."""
    e = s.double() ** 2
    return next(r for r in range(1, len(e) + 1) if e[:r].sum() >= tau * e.sum())


def matrices(state: dict, prefix: str, attn) -> dict:
    """Stacked W_O and the per-head fused W_QK_h, W_VO_h of one layer from a state_dict (row vectors: q = x W_q;
    RMSNorm gains folded into the projection after them). `attn` gives only the sizes."""
    W = {k.removeprefix(prefix): v.double() for k, v in state.items() if k.startswith(prefix)}
    H = attn.n_heads
    W_o = W["attn.out.weight"].T  # (H d_v, d): out = concat_h(o_h) W_o
    if "attn.kv_b.weight" in W:  # MLA: q and k in latent coordinates, the first d_k channels of each head
        dk, dv, dqk = attn.d_k, attn.d_v, attn.d_qk
        kv = (W["attn.kv_b.weight"] * W["attn.kv_norm.weight"]).T  # (r_kv, H (d_k + d_v))
        if "attn.q_b.weight" in W:
            q = (W["attn.q_b.weight"] * W["attn.q_norm.weight"]).T  # (r_q, H d_qk)
        else:
            q = (W["attn.qkv_a.weight"][:H * dqk] * W["attn_norm.weight"]).T
        qs = [q[:, h * dqk:h * dqk + dk] for h in range(H)]
        ks = [kv[:, h * (dk + dv):h * (dk + dv) + dk] for h in range(H)]
        vs = [kv[:, h * (dk + dv) + dk:(h + 1) * (dk + dv)] for h in range(H)]
    else:  # MHA: qkv rows [W_q; W_k; W_v]
        dv = attn.head_dim
        qkv = (W["attn.qkv.weight"] * W["attn_norm.weight"]).T  # (d, 3 H d_h)
        qs, ks, vs = ([qkv[:, (j * H + h) * dv:(j * H + h + 1) * dv] for h in range(H)] for j in range(3))
    os = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    return {"o": W_o, "qk": [q @ k.T for q, k in zip(qs, ks)], "vo": [v @ o for v, o in zip(vs, os)]}


def expected(state: dict, blocks, prefix: str = "model.trunk.blocks.") -> dict[str, float]:
    out = {}
    for i, block in enumerate(blocks):
        m = matrices(state, f"{prefix}{i}.", block.attn)
        for tau in TAUS:
            out[f"rank/layer{i}/o_{tau}"] = erank(torch.linalg.svdvals(m["o"]), tau)
            for kind in ("qk", "vo"):
                r = [erank(torch.linalg.svdvals(x), tau) for x in m[kind]]
                out[f"rank/layer{i}/{kind}_mean_{tau}"] = sum(r) / len(r)
                out[f"rank/layer{i}/{kind}_min_{tau}"] = min(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["model=mha"], ["model=mla", "task=clm"]], ids=["mha_encoder", "mla_decoder"])
def test_logged_ranks_equal_the_checkpoints(variant, cache_dir, tmp_path):
    from test_train import metrics

    from conftest import compose
    from ethos import checkpoint
    from ethos.pretrained import load_task
    from ethos.study import train

    train(compose(["debug=tiny", *variant, "logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=4",
                   "trainer.log_every_n_steps=3", "callbacks.ranks.every_n_steps=2"], output_dir=tmp_path))
    m = metrics(tmp_path)
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["global_step"] == 4
    want = expected(ckpt["state_dict"], load_task(tmp_path)[0].model.trunk.blocks)
    assert len(want) == 2 * 2 * 5
    for key, value in want.items():
        # at steps 0, 2, 4 whatever log_every_n_steps (3), each once; the last one from the checkpoint's weights
        assert [s for s, _ in m[key]] == [0, 2, 4], key
        assert m[key][-1][1] == value, key


def orthonormal(m: int, n: int, g) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_planted_ranks(attention):
    """A ViT whose layer-0 W_O_h = A_h Q_h^T (A_h orthonormal columns, Q_h disjoint columns of one orthonormal Q:
    equal singular values, ranks o_ranks, stacked rank their sum), value maps that are isometries (W_VO_h keeps
    W_O_h's spectrum) and W_QK_h of rank qk_ranks (MHA: W_K_h an isometry): the callback logs those ranks."""
    from ethos.callbacks.ranks import AttentionRanks
    from ethos.models.attention import MHA, MLA
    from ethos.models.config import ModelConfig
    from ethos.models.ffn import SwiGLU
    from ethos.models.vit import ViT

    g = torch.Generator().manual_seed(0)
    d, H, dh, r_kv = 64, 4, 8, 24
    o_ranks, qk_ranks = [1, 5, 8, 3], [2, 7, 4, 8]
    attn = partial(MHA) if attention == "mha" else partial(MLA, q_latent=32, kv_latent=r_kv)
    cfg = ModelConfig(attn=attn, ffn=partial(SwiGLU, d_ff=64), d_model=d, n_layers=2, n_heads=H, head_dim=dh,
                      rope_dims=4)
    model = ViT(cfg, num_classes=3, img_size=16, patch_size=4)
    a = model.trunk.blocks[0].attn
    Q = orthonormal(d, sum(o_ranks), g).split(o_ranks, dim=1)
    W_o = torch.cat([orthonormal(dh, k, g) @ Qh.T for k, Qh in zip(o_ranks, Q)])  # (H d_v, d)
    with torch.no_grad():
        a.out.weight.copy_(W_o.T)
        if attention == "mha":  # W_V_h, W_K_h: orthonormal columns; W_Q_h rank k with equal singular values
            q = torch.cat([orthonormal(d, k, g) @ orthonormal(dh, k, g).T for k in qk_ranks], dim=1)
            k_, v = orthonormal(d, H * dh, g), orthonormal(d, H * dh, g)  # heads' columns orthonormal too
            a.qkv.weight.copy_(torch.cat([q, k_, v], dim=1).T)
        else:  # each head's [W_kvb_k W_kvb_v]: orthonormal columns (r_kv x (d_k + d_v))
            a.kv_b.weight.copy_(torch.stack([orthonormal(r_kv, 2 * dh, g).T for _ in range(H)]).reshape(-1, r_kv))
    logged = []
    cb = AttentionRanks(every_n_steps=1)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, strategy=None,
                              loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))])
    cb.on_train_start(trainer, SimpleNamespace(model=model, parameters=model.parameters))
    (got,) = logged
    for tau in TAUS:
        assert got[f"rank/layer0/o_{tau}"] == sum(o_ranks)
        assert got[f"rank/layer0/vo_mean_{tau}"] == sum(o_ranks) / H and got[f"rank/layer0/vo_min_{tau}"] == 1
        if attention == "mha":
            assert got[f"rank/layer0/qk_mean_{tau}"] == sum(qk_ranks) / H and got[f"rank/layer0/qk_min_{tau}"] == 2
    assert got["rank/layer1/o_0.999"] > sum(o_ranks)  # layer 1 untouched: near full rank
