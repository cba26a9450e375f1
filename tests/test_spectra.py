"""Attention spectra (issue 11): every reported singular value against torch.linalg.svdvals of the matrix built
from the loaded modules themselves (HF DeepseekV3 / Qwen2 / Qwen3, our MHA and MLA), FP8 block dequantisation
with partial edge blocks, planted ranks, the lazy hub path, resume, and the one-line errors."""

import copy
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ethos.analysis import spectra, store
from ethos.analysis.ethos_runs import EthosSource
from ethos.analysis.fp8 import dequantize_fp8
from ethos.analysis.sources import open_source
from ethos.analysis.synthetic import mla_config, mla_layer, quantize_fp8, write_checkpoint
from ethos.errors import ConfigError, DataUnavailable

RTOL = 1e-5


def randomize_norms(model, seed=0):
    """Non-trivial RMSNorm gains, so that folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def deepseek(q_lora_rank=32):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    return randomize_norms(DeepseekV3ForCausalLM(cfg).eval())


def qwen(version=2):
    import transformers

    torch.manual_seed(1)
    cls = {2: "Qwen2", 3: "Qwen3"}[version]
    cfg = getattr(transformers, f"{cls}Config")(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16)
    return randomize_norms(getattr(transformers, f"{cls}ForCausalLM")(cfg).eval())


def save(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2  # really sharded
    return path


# ---- reference matrices, built the way the HF forward uses the weights (x W convention, norms folded) ----

def hf_mla_matrices(model, i) -> dict:
    """In float64 (products too). modeling_deepseek_v3: q_states.view(B, T, H, d_nope + d_r) (q_pass first),
    kv_b_proj(...).view(B, T, H, d_nope + d_v) split [k_nope, v], attn_output.reshape(B, T, H * d_v) -> o_proj."""
    layer, c = model.model.layers[i].double(), model.config
    a, g = layer.self_attn, layer.input_layernorm.weight
    H, dn, dr, dv, rkv = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                          c.kv_lora_rank)
    qk, kvw = dn + dr, dn + dv
    W_o = a.o_proj.weight.T
    W_q = (a.q_b_proj.weight * a.q_a_layernorm.weight).T if c.q_lora_rank else (a.q_proj.weight * g).T
    W_kv = (a.kv_b_proj.weight * a.kv_a_layernorm.weight).T
    W_kva = (a.kv_a_proj_with_mqa.weight * g).T
    o = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    q = [W_q[:, h * qk:h * qk + dn] for h in range(H)]
    k = [W_kv[:, h * kvw:h * kvw + dn] for h in range(H)]
    v = [W_kv[:, h * kvw + dn:(h + 1) * kvw] for h in range(H)]
    m = {"o_head": o, "o": W_o, "qk": [q[h] @ k[h].T for h in range(H)], "vo": [v[h] @ o[h] for h in range(H)],
         "kva": W_kva[:, :rkv], "kr": W_kva[:, rkv:]}
    if c.q_lora_rank:
        m["qa"] = (a.q_a_proj.weight * g).T
    return m


def hf_gqa_matrices(model, i) -> dict:
    """In float64. modeling_qwen2/3: q/k/v_proj(x).view(B, T, -1, d_h); repeat_kv gives query head h the kv head
    h // (H / G); Qwen3's q_norm / k_norm gains multiply each head's channels."""
    layer, c = model.model.layers[i].double(), model.config
    a, g = layer.self_attn, layer.input_layernorm.weight
    H, G, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def heads(w, n, norm=None):
        w = (w * g).T
        return [w[:, j * dh:(j + 1) * dh] * (1 if norm is None else norm.weight) for j in range(n)]

    q, k = heads(a.q_proj.weight, H, getattr(a, "q_norm", None)), heads(a.k_proj.weight, G, getattr(a, "k_norm", None))
    v, W_o = heads(a.v_proj.weight, G), a.o_proj.weight.T
    o = [W_o[h * dh:(h + 1) * dh] for h in range(H)]
    kv = [h // (H // G) for h in range(H)]
    return {"o_head": o, "o": W_o, "qk": [q[h] @ k[kv[h]].T for h in range(H)],
            "vo": [v[kv[h]] @ o[h] for h in range(H)]}


def assert_spectrum(ours: torch.Tensor, matrix: torch.Tensor, what: str) -> None:
    """Our values are the first n of svdvals(matrix) to RTOL; the rest of its values are 0 (the product's rank
    bound). Singular values that are 0 in exact arithmetic (a rank-deficient matrix: MLA-o's stacked W_O) are 0
    only to rounding in any method: those compare to 1e-7 of s_1."""
    ref = torch.linalg.svdvals(matrix.detach().double())
    n = ours.shape[-1]
    torch.testing.assert_close(ours.double(), ref[:n], rtol=RTOL, atol=1e-7 * ref[0], msg=what)
    assert (ref[n:] <= 1e-10 * ref[0]).all(), what


def assert_layer(out: Path, i: int, matrices: dict) -> None:
    svals, shapes = store.load_layer(out / "svals" / f"layer_{i:03d}.npz")
    assert set(svals) == set(matrices), (set(svals), set(matrices))
    for kind, m in matrices.items():
        if isinstance(m, list):
            assert svals[kind].shape[0] == len(m)
            for h, mh in enumerate(m):
                assert shapes[kind] == tuple(mh.shape)
                assert_spectrum(svals[kind][h], mh, f"layer {i} {kind} head {h}")
        else:
            assert shapes[kind] == tuple(m.shape)
            assert_spectrum(svals[kind], m, f"layer {i} {kind}")


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_deepseek_v3_every_singular_value(tmp_path, q_lora_rank):
    model = deepseek(q_lora_rank)
    rows = spectra.analyse(str(save(model, tmp_path / "ckpt")), tmp_path / "out", progress=False,
                           plots=q_lora_rank is not None)  # plotting once is enough (and takes seconds)
    for i in range(3):
        assert_layer(tmp_path / "out", i, hf_mla_matrices(model, i))
    # one row per layer x kind x head, measures consistent with the values
    kinds = {"o_head": 4, "qk": 4, "vo": 4, "o": 1, "kva": 1, "kr": 1, **({"qa": 1} if q_lora_rank else {})}
    assert len(rows) == 3 * sum(kinds.values())
    if q_lora_rank:
        for png in ("erank", "heatmap_o_head", "heatmap_qk", "heatmap_vo", "spectra_layer_0", "spectra_layer_2"):
            assert (tmp_path / "out" / f"{png}.png").is_file(), png
    table = json.loads((tmp_path / "out" / "spectra.json").read_text())
    assert table == json.loads(json.dumps(sorted(rows, key=lambda r: (r["layer"], r["kind"], r["head"] or -1))))


@pytest.mark.parametrize("version", [2, 3])
def test_qwen_gqa_every_singular_value(tmp_path, version):
    model = qwen(version)
    spectra.analyse(str(save(model, tmp_path / "ckpt")), tmp_path / "out", progress=False, plots=False)
    for i in range(2):
        assert_layer(tmp_path / "out", i, hf_gqa_matrices(model, i))


# ---- FP8 ----

def naive_dequant(q, scale, block=128):
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            b = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[b] = q[b].float() * scale[i, j]
    return out


@pytest.mark.parametrize("shape", [(200, 300), (130, 257), (128, 129), (100, 64), (256, 384)])
def test_fp8_dequantisation_handles_edge_blocks(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    # blocks of very different magnitudes: an edge block read with a neighbour's scale (or left unscaled) fails
    rows, cols = torch.arange(shape[0])[:, None] // 128, torch.arange(shape[1])[None] // 128
    w = w * 10.0 ** (rows - 2 * cols).float()
    q, scale = quantize_fp8(w)
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    ours = dequantize_fp8(q, scale)
    assert torch.equal(ours, naive_dequant(q, scale))
    # within e4m3 rounding of the original: 3 mantissa bits (half an ulp: 2^-4 relative), subnormals near 0
    bound = 2.0 ** -4 * w.abs() + 2.0 ** -10 * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[
        :shape[0], :shape[1]]
    assert ((ours - w).abs() <= bound).all()
    with pytest.raises(ConfigError, match="expected"):
        dequantize_fp8(q, scale[:-1])


def test_fp8_checkpoint_scales_in_other_shards(tmp_path):
    """A DeepSeek-style FP8 layer (scales in another shard than their weights, bf16 norms) reads as the naive
    block dequantisation, and its spectra are those of the dequantised matrices."""
    cfg = mla_config(d=200, heads=3, q_latent=136, kv_latent=130, d_nope=24, d_rope=8, d_v=20, fp8=True)
    tensors = mla_layer(cfg, 0, torch.Generator().manual_seed(0))
    stored = write_checkpoint(tmp_path / "ckpt", cfg, tensors, shards=3, fp8=True)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    w = "model.layers.0.self_attn.o_proj.weight"
    assert index[w] != index[w + "_scale_inv"] and stored[w].dtype == torch.float8_e4m3fn
    src = open_source(str(tmp_path / "ckpt"))
    for name in tensors:
        if tensors[name].ndim == 2:
            assert torch.equal(src.reader[name], naive_dequant(stored[name], stored[name + "_scale_inv"])), name
    # the spectra equal those of matrices built from the naive dequantisation
    deq = {k: (naive_dequant(v, stored[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v).double()
           for k, v in stored.items() if not k.endswith("_scale_inv")}
    spectra.analyse(str(tmp_path / "ckpt"), tmp_path / "out", progress=False, plots=False)
    p = "model.layers.0."
    g, H, dn, dv = deq[p + "input_layernorm.weight"], 3, 24, 20
    W_o = deq[p + "self_attn.o_proj.weight"].T
    W_q = (deq[p + "self_attn.q_b_proj.weight"] * deq[p + "self_attn.q_a_layernorm.weight"]).T
    W_kv = (deq[p + "self_attn.kv_b_proj.weight"] * deq[p + "self_attn.kv_a_layernorm.weight"]).T
    o = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    assert_layer(tmp_path / "out", 0, {
        "o_head": o, "o": W_o,
        "qk": [W_q[:, h * 32:h * 32 + dn] @ W_kv[:, h * 44:h * 44 + dn].T for h in range(H)],
        "vo": [W_kv[:, h * 44 + dn:(h + 1) * 44] @ o[h] for h in range(H)],
        "qa": (deq[p + "self_attn.q_a_proj.weight"] * g).T,
        "kva": (deq[p + "self_attn.kv_a_proj_with_mqa.weight"][:130] * g).T,
        "kr": (deq[p + "self_attn.kv_a_proj_with_mqa.weight"][130:] * g).T})


# ---- planted ranks ----

def orthonormal(m, n, g):
    return torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]


def test_planted_ranks_come_out_exactly(tmp_path):
    """Equal singular values on planted subspaces: the effective rank at 0.99 and 0.999 is the planted rank,
    per head (W_O_h, W_VO_h, W_QK_h), stacked (sum over heads) and for the down-projections."""
    g = torch.Generator().manual_seed(0)
    d, H, r_q, r_kv, dn, dr, dv = 96, 4, 40, 24, 8, 4, 12
    o_ranks, qk_ranks, qa_rank, kva_rank, kr_rank = [1, 5, 12, 7], [2, 8, 3, 6], 17, 9, 3
    cfg = mla_config(d, H, r_q, r_kv, dn, dr, dv)
    p = "model.layers.0."
    # W_O_h = A_h Q_h^T: A_h (d_v x k_h) orthonormal columns, the Q_h disjoint columns of one orthonormal Q
    Q = orthonormal(d, sum(o_ranks), g).split(o_ranks, dim=1)
    W_o = torch.cat([orthonormal(dv, k, g) @ Qh.T for k, Qh in zip(o_ranks, Q)])  # (H d_v, d)
    # W_kvb per head: orthonormal columns (an isometry), so W_VO_h and W_QK_h keep the planted spectra
    kv_b = torch.stack([orthonormal(r_kv, dn + dv, g).T for _ in range(H)]).reshape(H * (dn + dv), r_kv)
    q_b = torch.cat([torch.cat([(orthonormal(r_q, k, g) @ orthonormal(dn, k, g).T).T,
                                torch.randn(dr, r_q, generator=g, dtype=torch.float64)]) for k in qk_ranks])
    low = lambda m, n, k: orthonormal(m, k, g) @ orthonormal(n, k, g).T  # noqa: E731
    kv_a = torch.cat([low(r_kv, d, kva_rank), low(dr, d, kr_rank)])
    gain = lambda n: torch.full((n,), 1.7)  # noqa: E731  constant gains scale, and keep ranks
    tensors = {p + "input_layernorm.weight": gain(d), p + "self_attn.q_a_proj.weight": low(r_q, d, qa_rank),
               p + "self_attn.q_a_layernorm.weight": gain(r_q), p + "self_attn.q_b_proj.weight": q_b,
               p + "self_attn.kv_a_proj_with_mqa.weight": kv_a, p + "self_attn.kv_a_layernorm.weight": gain(r_kv),
               p + "self_attn.kv_b_proj.weight": kv_b, p + "self_attn.o_proj.weight": W_o.T}
    write_checkpoint(tmp_path / "ckpt", cfg, {k: v.float() for k, v in tensors.items()})
    rows = spectra.analyse(str(tmp_path / "ckpt"), tmp_path / "out", progress=False, plots=False)
    want = {("o_head", h): k for h, k in enumerate(o_ranks)} | {("vo", h): k for h, k in enumerate(o_ranks)}
    want |= {("qk", h): k for h, k in enumerate(qk_ranks)}
    want |= {("o", None): sum(o_ranks), ("qa", None): qa_rank, ("kva", None): kva_rank, ("kr", None): kr_rank}
    got = {(r["kind"], r["head"]): (r["erank_0.99"], r["erank_0.999"]) for r in rows}
    assert got == {key: (k, k) for key, k in want.items()}


def test_effective_and_stable_rank_definitions():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # energies 9, 4, 1 of 14: 9/14 < 0.99, 13/14 < 0.99, 14/14 -> 3
    assert spectra.effective_rank(s, 0.99).tolist() == [3, 4, 0]
    assert spectra.effective_rank(torch.tensor([10.0, 1.0]), 0.99).item() == 1  # 100/101 >= 0.99
    assert spectra.stable_rank(s[:2]).tolist() == pytest.approx([14 / 9, 4.0])


# ---- our own runs ----

@pytest.fixture(scope="module")
def ethos_run(cache_dir, tmp_path_factory):
    """A tiny MLA encoder whose first layer is dense MHA (model.num_dense_layers=1): both of our layouts."""
    from conftest import compose
    from ethos.study import train

    out = tmp_path_factory.mktemp("mla_run")
    train(compose(["debug=tiny", "model=mla", "model.num_dense_layers=1", "logger=csv", "print_config=false",
                   "trainer.max_steps=2", "trainer.val_check_interval=2"], output_dir=out))
    return out


def ethos_matrices(block) -> dict:
    """From the module weights as the forward uses them (ethos.models.attention): MHA.qkv rows [W_q (H d_h);
    W_k (H_kv d_h); W_v (H_kv d_h)], query head h reading key/value head h // (H / H_kv); MLA.qkv_a rows
    [W_qa; W_kva; W_kr], kv_b rows per head (d_k + d_v); heads concatenated into `out`; QK-norm gains on the
    q / k channels they scale."""
    from ethos.models.attention import MLA, MLAO

    a = copy.deepcopy(block.attn).double()
    g = block.attn_norm.weight.double()
    gq, gk = (a.q_head_norm.weight, a.k_head_norm.weight) if a.q_head_norm is not None else (1.0, 1.0)
    W_o = (a.o_a.weight.T @ a.o_b.weight.T) if isinstance(a, MLAO) else a.out.weight.T  # MLA-o: o W_OA W_OB
    if isinstance(a, MLA):
        H, dk, dv = a.n_heads, a.d_k, a.d_v
        kv = list(range(H))
        q_in, r_kv, _ = a.split
        down = (a.qkv_a.weight * g).T
        W_q = (a.q_b.weight * a.q_norm.weight).T if a.q_b is not None else down[:, :q_in]
        W_kv = (a.kv_b.weight * a.kv_norm.weight).T
        q = [W_q[:, h * a.d_qk:h * a.d_qk + dk] * gq for h in range(H)]
        k = [W_kv[:, h * (dk + dv):h * (dk + dv) + dk] * gk for h in range(H)]
        v = [W_kv[:, h * (dk + dv) + dk:(h + 1) * (dk + dv)] for h in range(H)]
        extra = {"kva": down[:, q_in:q_in + r_kv]}
        extra |= {"qa": down[:, :q_in]} if a.q_b is not None else {}
        g_kr = a.k_rope_norm.weight if a.k_rope_norm is not None else 1.0
        extra |= {"kr": down[:, q_in + r_kv:] * g_kr} if a.d_r else {}
    else:
        H, G, dv = a.n_heads, a.n_kv_heads, a.head_dim
        kv = [h // (H // G) for h in range(H)]
        W = (a.qkv.weight * g).T
        head = lambda start, h: W[:, start + h * dv:start + (h + 1) * dv]  # noqa: E731
        q = [head(0, h) * gq for h in range(H)]
        k = [head(H * dv, j) * gk for j in range(G)]
        v = [head((H + G) * dv, j) for j in range(G)]
        extra = {}
    o = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    return {"o_head": o, "o": W_o, "qk": [q[h] @ k[kv[h]].T for h in range(H)],
            "vo": [v[kv[h]] @ o[h] for h in range(H)], **extra}


@pytest.mark.slow
def test_ethos_run_every_singular_value(ethos_run, tmp_path):
    from ethos.models.attention import MHA, MLA
    from ethos.pretrained import load_task

    spectra.analyse(str(ethos_run), tmp_path / "out", progress=False, plots=False)
    task, _ = load_task(ethos_run)
    blocks = task.model.trunk.blocks
    assert isinstance(blocks[0].attn, MHA) and isinstance(blocks[1].attn, MLA)
    for i, block in enumerate(blocks):
        assert_layer(tmp_path / "out", i, ethos_matrices(block))


@pytest.fixture(scope="module")
def gqa_run(cache_dir, tmp_path_factory):
    """A tiny decoder with GQA (4 query heads, 2 key/value heads) and QK-norm."""
    from conftest import compose
    from ethos.study import train

    out = tmp_path_factory.mktemp("gqa_run")
    train(compose(["debug=tiny", "task=clm", "model=gqa", "model.attn.n_kv_heads=2", "model.attn.qk_norm=true",
                   "logger=csv", "print_config=false", "trainer.max_steps=2", "trainer.val_check_interval=2"],
                  output_dir=out))
    return out


def assert_gqa_split(w, attn, norm) -> None:
    """The reader's per-head W_Q / W_K / W_V are row slices of the fused qkv weight: rows [H d_h; H_kv d_h;
    H_kv d_h], query head h reading key/value head h // (H / H_kv), gains (input norm, QK-norm) folded."""
    H, G, d_h = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W, g = attn.qkv.weight.detach().double(), norm.weight.detach().double()
    gq, gk = (attn.q_head_norm.weight.detach().double(), attn.k_head_norm.weight.detach().double()) \
        if attn.q_head_norm is not None else (1.0, 1.0)
    rows = lambda start, h: W[start + h * d_h:start + (h + 1) * d_h]  # noqa: E731
    assert (w.n_heads, w.n_kv_heads) == (H, G) and w.kv_head.tolist() == [h // (H // G) for h in range(H)]
    assert w.q.shape == (H, W.shape[1], d_h) and w.k.shape == w.v.shape == (G, W.shape[1], d_h)
    for h in range(H):
        torch.testing.assert_close(w.q[h], (rows(0, h) * g).T * gq, rtol=1e-12, atol=0)
    for j in range(G):
        torch.testing.assert_close(w.k[j], (rows(H * d_h, j) * g).T * gk, rtol=1e-12, atol=0)
        torch.testing.assert_close(w.v[j], (rows((H + G) * d_h, j) * g).T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_kv,qk_norm", [(1, False), (2, True), (4, False)])
def test_ethos_gqa_split_by_rows(n_kv, qk_norm):
    from types import SimpleNamespace

    from ethos.models.attention import MHA

    torch.manual_seed(0)
    attn = MHA(64, 4, head_dim=8, rope_dims=4, n_kv_heads=n_kv, qk_norm=qk_norm)
    block = randomize_norms(torch.nn.ModuleDict({"attn": attn, "attn_norm": torch.nn.RMSNorm(64)}))
    src = object.__new__(EthosSource)
    src.name, src.dtype = "gqa", torch.float64
    src.blocks = [SimpleNamespace(attn=block.attn, attn_norm=block.attn_norm)]
    assert_gqa_split(src.read(0), block.attn, block.attn_norm)


@pytest.mark.slow
def test_ethos_gqa_run_is_split_by_its_recipe(gqa_run, tmp_path):
    """A GQA run read back from its checkpoint: n_kv_heads comes from the run's recipe (the model is rebuilt from
    it), the fused rows are split [H d_h; H_kv d_h; H_kv d_h], and every singular value is right."""
    from ethos.pretrained import load_task

    task, _ = load_task(gqa_run)
    src = EthosSource(gqa_run, dtype=torch.float64)
    for i, block in enumerate(task.model.trunk.blocks):
        assert block.attn.n_kv_heads == 2 and block.attn.n_heads == 4
        assert_gqa_split(src.read(i), block.attn, block.attn_norm)
    spectra.analyse(str(gqa_run), tmp_path / "out", progress=False, plots=False)
    for i, block in enumerate(task.model.trunk.blocks):
        assert_layer(tmp_path / "out", i, ethos_matrices(block))


@pytest.mark.parametrize("variant", ["mla_o_decoupled", "mla_no_q_latent", "mha_layernorm", "gqa", "mqa_qk_norm",
                                     "mla_qk_norm", "mla_o_decoupled_qk_norm"])
def test_ethos_layouts_every_singular_value(variant):
    """The other branches of our reader, on modules built directly: MLA-o (W_O = W_OA W_OB), decoupled rope
    (the shared rope key head, d_nope pairs), no query latent, MHA under a LayerNorm, GQA / MQA (key/value heads
    shared by groups of query heads), QK-norm gains (MHA, MLA partial, decoupled: nope and rope gains)."""
    from types import SimpleNamespace

    from ethos.models.attention import MHA, MLA, MLAO

    torch.manual_seed(0)
    common = {"d_model": 64, "n_heads": 4, "head_dim": 8}
    attn, norm = {
        "mla_o_decoupled": (lambda: MLAO(**common, rope_dims=4, q_latent=24, kv_latent=16, v_head_dim=12,
                                         rope_style="decoupled", o_latent=20), torch.nn.RMSNorm(64)),
        "mla_no_q_latent": (lambda: MLA(**common, rope_dims=4, q_latent=None, kv_latent=16), torch.nn.RMSNorm(64)),
        "mha_layernorm": (lambda: MHA(**common, rope_dims=4), torch.nn.LayerNorm(64)),
        "gqa": (lambda: MHA(**common, rope_dims=4, n_kv_heads=2), torch.nn.RMSNorm(64)),
        "mqa_qk_norm": (lambda: MHA(**common, rope_dims=4, n_kv_heads=1, qk_norm=True), torch.nn.RMSNorm(64)),
        "mla_qk_norm": (lambda: MLA(**common, rope_dims=4, q_latent=24, kv_latent=16, qk_norm=True),
                        torch.nn.RMSNorm(64)),
        "mla_o_decoupled_qk_norm": (lambda: MLAO(**common, rope_dims=4, q_latent=None, kv_latent=16,
                                                 rope_style="decoupled", o_latent=20, qk_norm=True),
                                    torch.nn.RMSNorm(64)),
    }[variant]
    block = randomize_norms(torch.nn.ModuleDict({"attn": attn(), "attn_norm": norm}))
    for p in block.parameters():  # init makes some weights zero-ish or identical: random everywhere
        torch.nn.init.normal_(p, std=0.1) if p.ndim == 2 else None
    src = object.__new__(EthosSource)
    src.name, src.dtype, src.blocks = variant, torch.float32, [SimpleNamespace(attn=block.attn,
                                                                               attn_norm=block.attn_norm)]
    svals, shapes = spectra.layer_spectra(src, 0)
    matrices = ethos_matrices(SimpleNamespace(attn=block.attn, attn_norm=block.attn_norm))
    assert set(svals) == set(matrices)
    for kind, m in matrices.items():
        for h, mh in enumerate(m if isinstance(m, list) else [m]):
            assert_spectrum(svals[kind][h] if isinstance(m, list) else svals[kind], mh, f"{variant} {kind} {h}")


# ---- sources, resume, errors ----

class LocalHub:
    """The hub, served from local copies of its repos ({repo id: directory}), through the huggingface_hub calls the
    hub readers make: hf_hub_download, parse_safetensors_file_metadata (huggingface_hub's own parse of the file's
    header) and HfFileSystem, whose ranged reads go to fsspec's local file system. Records what was asked."""

    def __init__(self, monkeypatch, repos: dict[str, Path]):
        import huggingface_hub
        from fsspec.implementations.local import LocalFileSystem

        self.repos, self.downloads, self.tables, self.reads = repos, [], [], []
        hub = self

        class FileSystem:  # huggingface_hub.HfFileSystem's open(), on local files
            def __init__(self, *args, **kwargs):
                self.local = LocalFileSystem()

            def open(self, path, mode="rb", revision=None, **kwargs):
                return hub.Recorded(hub, path, self.local.open(str(hub.path(path)), mode, **kwargs))

        def download(repo_id, filename, **kwargs):
            self.downloads.append(filename)
            return str(self.path(f"{repo_id}/{filename}"))

        def table(repo_id, filename, revision=None, **kwargs):
            self.tables.append(filename)
            return huggingface_hub.parse_local_safetensors_file_metadata(self.path(f"{repo_id}/{filename}"))

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", table)
        monkeypatch.setattr(huggingface_hub, "HfFileSystem", FileSystem)

    def path(self, hub_path: str) -> Path:
        repo_id, filename = hub_path.rsplit("/", 1)
        return self.repos[repo_id] / filename

    class Recorded:
        """A file open for reading whose reads are recorded as (file name, start, end)."""

        def __init__(self, hub, path, f):
            self.hub, self.name, self.f, self.size = hub, path.rsplit("/", 1)[1], f, f.size

        def seek(self, loc, whence=0):
            return self.f.seek(loc, whence)

        def read(self, length=-1):
            start = self.f.tell()
            data = self.f.read(length)
            self.hub.reads.append((self.name, start, start + len(data)))
            return data


def test_hub_path_downloads_only_the_attention_shards(tmp_path, monkeypatch):
    repo = save(deepseek(), tmp_path / "repo")
    requested = LocalHub(monkeypatch, {"acme/tiny-deepseek": repo}).downloads
    spectra.analyse("acme/tiny-deepseek", tmp_path / "out", first=1, progress=False, plots=False)
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if k.startswith("model.layers.0.")
              and ("self_attn." in k or "input_layernorm" in k)}
    assert set(requested) == {"config.json", "model.safetensors.index.json", *needed}
    assert len(requested) == len(set(requested))  # each file fetched once
    assert len(needed) < len(set(weight_map.values()))  # other shards exist and were not fetched
    assert_layer(tmp_path / "out", 0, hf_mla_matrices(deepseek(), 0))


def test_hub_byte_ranges_fetch_only_the_attention_tensors(tmp_path, monkeypatch):
    """--ranges: each needed file's tensor table once, then exactly the bytes of layer 0's attention tensors;
    the same spectra."""
    from safetensors import safe_open

    repo = save(deepseek(), tmp_path / "repo")
    hub = LocalHub(monkeypatch, {"acme/tiny-deepseek": repo})
    spectra.analyse("acme/tiny-deepseek", tmp_path / "out", first=1, progress=False, plots=False, ranges=True)
    assert hub.downloads == ["config.json", "model.safetensors.index.json"]  # no shard as a whole
    assert_layer(tmp_path / "out", 0, hf_mla_matrices(deepseek(), 0))
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    wanted, files = 0, set()
    for name, f in weight_map.items():
        if name.startswith("model.layers.0.") and ("self_attn." in name or "input_layernorm" in name):
            with safe_open(str(repo / f), framework="pt") as st:
                t = st.get_tensor(name)
            wanted, files = wanted + t.numel() * t.element_size(), files | {f}
    assert sum(b - a for _, a, b in hub.reads) == wanted and len(hub.reads) == len(set(hub.reads))
    assert sorted(hub.tables) == sorted(files) and len(files) < len(set(weight_map.values()))


def test_hub_byte_ranges_read_what_safe_open_reads(tmp_path, monkeypatch):
    """Every tensor of an FP8 checkpoint (e4m3 weights, float32 scales in other shards, bf16 norms) read by byte
    ranges equals safe_open's, bit for bit, and dequantises as the whole-file reader does."""
    from safetensors import safe_open

    cfg = mla_config(d=200, heads=3, q_latent=136, kv_latent=130, d_nope=24, d_rope=8, d_v=20, fp8=True)
    write_checkpoint(tmp_path / "ckpt", cfg, mla_layer(cfg, 0, torch.Generator().manual_seed(0)), shards=3,
                     fp8=True)
    LocalHub(monkeypatch, {"acme/fp8": tmp_path / "ckpt"})
    ranged, whole = open_source("acme/fp8", ranges=True).reader, open_source(str(tmp_path / "ckpt")).reader
    dtypes = set()
    for name, f in ranged.weight_map.items():
        with safe_open(str(tmp_path / "ckpt" / f), framework="pt") as st:
            want = st.get_tensor(name)
        got = ranged.raw(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name  # bits: float8 has no equal
        if not name.endswith("_scale_inv"):
            assert torch.equal(ranged[name], whole[name]), name
        dtypes.add(want.dtype)
    assert dtypes == {torch.float8_e4m3fn, torch.float32, torch.bfloat16}


@pytest.mark.parametrize("offline", [True, False])
def test_hub_without_network_fails_fast_in_one_line(tmp_path, monkeypatch, offline):
    """HF_HUB_OFFLINE=1, or no connection at all (an endpoint nothing listens on): one line, in seconds."""
    import time

    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailable) as err:
        open_source("acme/not-cached")
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(err.value) and "local copy" in str(err.value)


def test_unknown_layout_names_its_config_class_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                      "num_hidden_layers": 2}))
    with pytest.raises(ConfigError) as err:
        open_source(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "GPT2Config" in msg and "DeepseekV3Config" in msg and "Qwen2Config" in msg


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    path = save(qwen(), tmp_path / "ckpt")
    first = spectra.analyse(str(path), tmp_path / "out", first=1, progress=False, plots=False)
    calls = []
    real = spectra.layer_spectra
    monkeypatch.setattr(spectra, "layer_spectra", lambda src, i, dtype: calls.append(i) or real(src, i, dtype))
    rows = spectra.analyse(str(path), tmp_path / "out", progress=False, plots=False)
    assert calls == [1]  # layer 0 was already there
    assert [r for r in rows if r["layer"] == 0] == first
    with open(tmp_path / "out" / "spectra.csv") as f:
        assert sum(1 for _ in f) == len(rows) + 1
    with pytest.raises(ConfigError, match="choose another --out"):
        spectra.analyse(str(save(deepseek(), tmp_path / "other")), tmp_path / "out", progress=False, plots=False)


def readme_commands() -> list[list[str]]:
    """The spectra commands of the README's code blocks (the prose's `SOURCE --out DIR` is a synopsis)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [shlex.split(m.group(1).split("#")[0]) for block in blocks
            for m in re.finditer(r"^python -m ethos\.analysis\.spectra (.*)$", block, flags=re.M)]


@pytest.mark.slow
def test_readme_commands_run(ethos_run, tmp_path, monkeypatch):
    """Each documented command, run from a directory where its SOURCE exists: the README's pretraining run
    (outputs/train/runs/default, our tiny MLA run) or, for a hub repo id, a tiny stand-in of its architecture."""
    import shutil

    commands = readme_commands()
    assert commands, "README documents no spectra command"
    stand_in = save(deepseek(), tmp_path / "hub")
    LocalHub(monkeypatch, {"deepseek-ai/DeepSeek-V3": stand_in})
    monkeypatch.chdir(tmp_path)
    for args in commands:
        source = Path(args[0])
        if not source.is_absolute() and len(source.parts) > 2:  # a run dir of the README's pretraining commands
            shutil.copytree(ethos_run, source, dirs_exist_ok=True)
        spectra.main(args)
        out = Path(args[args.index("--out") + 1])
        assert (out / "spectra.csv").is_file() and (out / "erank.png").is_file(), args

