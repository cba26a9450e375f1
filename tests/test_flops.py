"""Closed-form FLOPs against torch's FlopCounterMode on the real modules and whole backbones; the
counter's extra formulas against the matmuls they stand for; throughput metrics of a short run
against the closed form."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import compose
from ethos.checks import build_model_config
from ethos.kernels.latent_experts import expert_mix
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.decoder import Decoder
from ethos.models.encoder import Encoder
from ethos.models.ffn import MLP, SwiGLU
from ethos.models.flops import TRAIN_FACTOR, flop_counter
from ethos.models.moe import PEER, LatentExperts, MoE
from ethos.models.vit import ViT

# forward: every matmul is counted the same way by both, so they must agree exactly (a 5% tolerance
# would hide e.g. a forgotten MLM head at these sizes); training: 3x forward is a convention (the
# counter's flash-attention backward also counts recomputed scores), within TOL
TOL = 0.05
# small sizes of each model=...; the expert sizes keep N * d small enough for a CPU test
SMALL = {"mha": [], "gqa": [], "mla": [], "mla_o": [],
         "peer": ["model.ffn.num_experts=1024", "model.ffn.d_query=32"],
         "ethos": ["model.ffn.num_experts=1024", "model.ffn.d_query=32", "model.ffn.d_latent=16",
                   "model.ffn.d_hidden=48"],
         # the grouped GEMM: the padded batch also multiplies its empty slots, which the closed form does not count
         "moe": ["model.ffn.num_experts=16", "model.ffn.top_k=2", "model.ffn.d_expert=32", "model.ffn.impl=grouped"]}


def counted(fn, counter=flop_counter) -> int:
    with counter() as fc:
        fn()
    return fc.get_total_flops()


# ---------------------------------------------------------------- attention
ATTN = [
    (MHA, {}), (MHA, {"bias": True}),
    (MLA, {"q_latent": 24, "kv_latent": 16}),                                     # partial, q latent
    (MLA, {"q_latent": None, "kv_latent": 16, "v_head_dim": 12}),                 # partial, q from x
    (MLA, {"q_latent": 24, "kv_latent": 16, "rope_style": "decoupled"}),
    (MLA, {"q_latent": None, "kv_latent": 16, "v_head_dim": 12, "rope_style": "decoupled", "bias": True}),
    (MLAO, {"q_latent": 24, "kv_latent": 16, "o_latent": 20}),
    (MLAO, {"q_latent": None, "kv_latent": 16, "o_latent": 20, "v_head_dim": 12, "rope_style": "decoupled"}),
    # score functions and gates (ethos/models/scores.py): the null key's column, the plain path, W_g
    (MHA, {"score": "softmax1", "gate": "head"}), (MHA, {"score": "relu"}),
    (MLA, {"q_latent": 24, "kv_latent": 16, "v_head_dim": 12, "score": "softmax1", "gate": "elementwise"}),
    (MLAO, {"q_latent": None, "kv_latent": 16, "o_latent": 20, "rope_style": "decoupled", "score": "sigmoid",
            "gate": "head"}),
    # GQA / MQA (narrower W_k, W_v; scores per query head, on SDPA's enable_gqa and the plain path) and QK-norm
    # (elementwise: no FLOPs of its own)
    (MHA, {"n_kv_heads": 2}), (MHA, {"n_kv_heads": 1, "score": "softmax1", "qk_norm": True}),
    (MHA, {"n_kv_heads": 2, "score": "relu", "gate": "elementwise", "bias": True}),
    (MLA, {"q_latent": 24, "kv_latent": 16, "rope_style": "decoupled", "qk_norm": True}),
]


@pytest.mark.parametrize("cls,kw", ATTN)
@pytest.mark.parametrize("T,causal", [(7, False), (33, True)])
def test_attention_flops_match_counter(cls, kw, T, causal):
    m = cls(48, 4, head_dim=16, rope_dims=8, **kw)
    x = torch.randn(3, T, 48)
    pad = torch.ones(3, T, dtype=torch.bool)
    pad[1, T // 2:] = False  # padding changes nothing: the scores are computed over all T keys
    want = cls.flops(48, 4, head_dim=16, rope_dims=8, seq_len=T, **kw) * 3 * T
    assert counted(lambda: m(x, attn_mask=pad, is_causal=causal)) == want


def test_attention_flops_grow_linearly_with_length():
    kw = {"q_latent": 24, "kv_latent": 16, "v_head_dim": 12, "rope_style": "decoupled"}
    f = [MLA.flops(48, 4, head_dim=16, rope_dims=8, seq_len=T, **kw) for T in (10, 20, 30)]
    assert f[2] - f[1] == f[1] - f[0] == 2 * 10 * 4 * ((16 + 8) + 12)  # q k^T over d_nope + d_r, p v over d_v


# ---------------------------------------------------------------- FFNs and experts
EXPERTS = {"num_experts": 256, "n_heads": 2, "top_k": 4, "d_query": 16}
FFNS = [
    (SwiGLU, {"d_ff": 80}), (MLP, {"d_ff": 80}),
    (PEER, {**EXPERTS, "impl": "naive"}), (PEER, {**EXPERTS, "impl": "torch", "activation": "relu"}),
    (LatentExperts, {**EXPERTS, "d_latent": 8, "d_hidden": 24, "impl": "naive"}),
    (LatentExperts, {**EXPERTS, "d_latent": 8, "d_hidden": 24, "impl": "torch"}),
    (MoE, {"num_experts": 8, "top_k": 2, "d_expert": 16, "n_shared": 1, "impl": "grouped"}),
    (MoE, {"num_experts": 8, "top_k": 3, "d_expert": 16, "n_shared": 0, "score": "softmax", "impl": "grouped"}),
]


@pytest.mark.parametrize("cls,kw", FFNS)
@pytest.mark.parametrize("B,T", [(3, 20), (1, 5)])  # latent experts: hidden table (60*8 > 256) or per selection
def test_ffn_flops_match_counter(cls, kw, B, T):
    torch.manual_seed(0)
    m = cls(48, **kw)
    x = torch.randn(B, T, 48)
    want = cls.flops(48, **kw, tokens=B * T) * B * T
    assert counted(lambda: m(x)) == pytest.approx(want, rel=1e-12)


def test_latent_expert_flops_pick_the_cheaper_generation():
    kw = {**EXPERTS, "d_latent": 8, "d_hidden": 24}
    sel = kw["n_heads"] * kw["top_k"]
    per_sel = LatentExperts.flops(48, **kw, tokens=256 // sel)  # T*H*k = N: generated per selection
    table = LatentExperts.flops(48, **kw, tokens=256 // sel + 1)  # > N: the whole table once
    assert per_sel - table == pytest.approx(2 * 8 * 24 * (sel - 256 / (256 // sel + 1)))


# ---------------------------------------------------------------- the counter's extra formulas
@pytest.mark.parametrize("tied", [False, True])  # PEER's two tables, ETHOS's one hidden table
def test_embedding_bag_formulas_equal_the_matmuls_they_replace(tied):
    """The reordered expert mixing runs aten embedding-bag kernels torch's counter does not know. Our
    formulas must give exactly what the counter gives the same math written as gathers + einsums
    (bmm), forward and backward."""
    torch.manual_seed(0)
    T, M, D, N = 6, 8, 24, 40
    idx, s = torch.randint(0, N, (T, M)), torch.rand(T, M)
    xp = torch.randn(T, D, requires_grad=True)
    U = torch.randn(N, D, requires_grad=True)
    V = U if tied else torch.randn(N, D, requires_grad=True)

    def bags():
        expert_mix(xp, U, V, idx, s, "gelu", "torch").sum().backward()

    def einsums():
        h = torch.einsum("tmd,td->tm", U[idx], xp)
        torch.einsum("tm,tmd->td", s * F.gelu(h), V[idx]).sum().backward()

    # forward: T*M dot products and weighted sums of length D; backward: two of each per op
    assert counted(bags) == counted(einsums, lambda: FlopCounterMode(display=False)) == 2 * 6 * T * M * D
    assert counted(bags, lambda: FlopCounterMode(display=False)) == 0  # why the formulas are needed


def test_cpu_attention_formula_equals_explicit_matmuls():
    """torch counts SDPA on CUDA kernels only; on CPU it runs a flash kernel the counter would miss."""
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    ours = counted(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    explicit = counted(lambda: (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).sum().backward(),
                       lambda: FlopCounterMode(display=False))
    fwd = 2 * 2 * 2 * 3 * 10 * 10 * 8
    assert explicit == 3 * fwd
    assert ours == fwd + 2.5 * fwd  # torch's flash backward formula also counts the recomputed scores


# ---------------------------------------------------------------- whole backbones from Hydra configs
def model_cfg(model: str):
    return build_model_config(compose([f"model={model}", "debug=tiny", *SMALL[model]]))


def check(closed: float, run, label: str) -> None:
    """Forward equal to the closed form; forward + backward within TOL of TRAIN_FACTOR x it."""
    fwd = counted(lambda: run())
    train = counted(lambda: run().backward())
    print(f"{label}: closed form {closed / 1e6:.3f} MFLOPs, counter {fwd / 1e6:.3f} ({fwd / closed - 1:+.2%}); "
          f"fwd+bwd / fwd {train / fwd:.3f}")
    assert fwd == pytest.approx(closed, rel=1e-9)
    assert train == pytest.approx(TRAIN_FACTOR * closed, rel=TOL)


@pytest.mark.parametrize("model", list(SMALL))
def test_encoder_flops_match_counter(model):
    cfg = model_cfg(model)
    torch.manual_seed(0)
    enc = Encoder(cfg, vocab_size=500)
    B, T = 4, 64
    ids = torch.randint(0, 500, (B, T))
    labels = torch.where(torch.rand(B, T) < 0.15, ids, -100)  # the MLM head runs at these only
    mask = (labels != -100).float().mean().item()
    check(enc.flops_per_token(T, B, mask) * B * T, lambda: enc.mlm_loss(ids, None, labels)[0], f"encoder {model}")


@pytest.mark.parametrize("model", ["gqa", "mla", "ethos", "moe"])
def test_decoder_flops_match_counter(model):
    torch.manual_seed(0)
    dec = Decoder(model_cfg(model), vocab_size=500)
    B, T = 4, 64
    ids = torch.randint(0, 500, (B, T))
    check(dec.flops_per_token(T, B) * B * T, lambda: dec.clm_loss(ids, None, ids)[0], f"decoder {model}")


@pytest.mark.parametrize("model,pool", [("mha", "cls"), ("mla_o", "avg"), ("peer", "cls")])
def test_vit_flops_match_counter(model, pool):
    torch.manual_seed(0)
    vit = ViT(model_cfg(model), num_classes=10, img_size=32, patch_size=4, pool=pool)
    images = torch.randn(3, 3, 32, 32)
    closed = vit.flops_per_token(batch_size=3) * 3 * 64  # 8 x 8 patches per image
    check(closed, lambda: vit(images).sum(), f"vit {model}")


def test_closed_form_reads_the_config():
    """Config changes move the closed form the way the module shapes say (no stale constants)."""
    a = Encoder(model_cfg("mla"), vocab_size=500).flops_per_token(64, 4)
    cfg = build_model_config(compose(["model=mla", "debug=tiny", "model.attn.kv_latent=64"]))
    b = Encoder(cfg, vocab_size=500).flops_per_token(64, 4)
    # 2 layers x 2 (fwd matmul) x (W_kva: d x 32 more + W_kvb: 32 more rows x H x (d_k + d_v))
    assert b - a == 2 * 2 * (64 * 32 + 32 * 4 * (16 + 16))


# ---------------------------------------------------------------- throughput of a run
@pytest.mark.slow
def test_short_run_logs_throughput_from_the_closed_form(cache_dir, tmp_path, capsys):
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
    from test_train import metrics

    from ethos.config import instantiate
    from ethos.study import train

    cfg = compose(["debug=tiny", "logger=csv", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
                   "callbacks.throughput.window_size=3"], output_dir=tmp_path)
    train(cfg)
    m = metrics(tmp_path)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    B, T = cfg.data.batch_size, cfg.data.seq_len
    enc = Encoder(build_model_config(cfg), **dm.task_kwargs())
    fwd_per_token = enc.flops_per_token(T, B, cfg.data.mlm_probability)
    steps = [s for s, _ in m["perf/flops_per_sec"]]
    assert steps and steps == [s for s, _ in m["perf/tokens_per_sec"]]
    assert len(steps) >= 3  # a window of 3 batches: rates from the 3rd step on
    for (_, flops), (_, tokens), (_, samples) in zip(m["perf/flops_per_sec"], m["perf/tokens_per_sec"],
                                                     m["perf/samples_per_sec"]):
        assert flops / tokens == pytest.approx(TRAIN_FACTOR * fwd_per_token, rel=1e-6)
        assert tokens == pytest.approx(samples * T, rel=1e-6)
    assert "perf/mfu" not in m  # no known peak on a CPU
    # the model summary shows the closed-form forward FLOPs of a batch, not Lightning's 0
    out = capsys.readouterr().out
    assert f"Total FLOPs: {get_human_readable_count(int(fwd_per_token * B * T))}" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="MFU needs a CUDA device (its peak FLOP/s is known)")
def test_gpu_run_logs_mfu(cache_dir, tmp_path):
    from lightning.fabric.utilities.throughput import get_available_flops
    from test_train import metrics

    from ethos.study import train

    cfg = compose(["debug=tiny", "logger=csv", "trainer=gpu", "trainer.max_steps=12", "trainer.log_every_n_steps=1",
                   "callbacks.throughput.window_size=3"], output_dir=tmp_path)
    train(cfg)
    m = metrics(tmp_path)
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16)  # trainer=gpu: bf16-mixed
    assert m["perf/mfu"] and peak, (m.get("perf/mfu"), peak)
    for (_, mfu), (_, flops) in zip(m["perf/mfu"], m["perf/flops_per_sec"]):
        assert 0 < mfu < 1 and mfu == pytest.approx(flops / peak, rel=1e-4)
