"""Patterns and messages (issue 21): every per-head W_QK^h and W_VO^h equals the matrix built by hand from the
modules' weights in float64 (HF Llama / Qwen2 GQA, DeepseekV3 with and without a q latent, our MHA, GQA, MLA and
MLA-o); the table's norms, copying scores and token circuits equal brute force over the whole vocabulary;
planted copying and previous-token heads are found; message sharing is exact under GQA; the tool resumes."""

import csv
import json

import pytest
import torch
from test_spectra import deepseek, randomize_norms, save

from conftest import compose
from ethos.analysis import circuits, heads, lens
from ethos.analysis.ethos_runs import EthosSource
from ethos.analysis.sources import open_source

F64 = dict(rtol=1e-10, atol=1e-12)


def llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie)
    return randomize_norms(LlamaForCausalLM(cfg).eval())


def qwen2(tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, tie_word_embeddings=tie)
    return randomize_norms(Qwen2ForCausalLM(cfg).eval())


HF_MODELS = {"llama": llama, "qwen2_tied_mqa": qwen2, "deepseek_q_latent": lambda: deepseek(32),
             "deepseek_no_q_latent": lambda: deepseek(None)}


# ---- hand-built factors, in float64, the way each forward uses its weights (x W convention) ----

def hf_heads(model, i) -> dict:
    """Per head q (q_in, d_k), k, v, o (d_v, d) in layer coordinates, plus the MLA down-projections and the
    vocabulary: E (V, d), U (d, V) with the final norm's gain."""
    c = model.config
    layer = model.model.layers[i]
    a, g = layer.self_attn, layer.input_layernorm.weight.double()
    H = c.num_attention_heads
    W_o = a.o_proj.weight.double().T
    if hasattr(a, "kv_b_proj"):  # modeling_deepseek_v3: q (H, d_nope + d_r) with q_pass first; kv_b (H, d_nope + d_v)
        dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        if c.q_lora_rank:
            W_q = (a.q_b_proj.weight.double() * a.q_a_layernorm.weight.double()).T
            qa = (a.q_a_proj.weight.double() * g).T
        else:
            W_q, qa = (a.q_proj.weight.double() * g).T, None
        W_kv = (a.kv_b_proj.weight.double() * a.kv_a_layernorm.weight.double()).T
        kva = (a.kv_a_proj_with_mqa.weight.double() * g).T[:, :c.kv_lora_rank]
        q = [W_q[:, h * (dn + dr):h * (dn + dr) + dn] for h in range(H)]
        k = [W_kv[:, h * (dn + dv):h * (dn + dv) + dn] for h in range(H)]
        v = [W_kv[:, h * (dn + dv) + dn:(h + 1) * (dn + dv)] for h in range(H)]
        kv = list(range(H))
    else:  # llama / qwen2: repeat_kv gives query head h the kv head h // (H / G)
        G, dh, dv = c.num_key_value_heads, c.head_dim, c.head_dim
        cut = lambda w, n: [(w.double() * g).T[:, j * dh:(j + 1) * dh] for j in range(n)]  # noqa: E731
        q, k, v = cut(a.q_proj.weight, H), cut(a.k_proj.weight, G), cut(a.v_proj.weight, G)
        qa = kva = None
        kv = [h // (H // G) for h in range(H)]
    o = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    E = model.model.embed_tokens.weight.double()
    U = (model.lm_head.weight.double() * model.model.norm.weight.double()).T
    return {"q": q, "k": [k[kv[h]] for h in range(H)], "v": [v[kv[h]] for h in range(H)], "o": o, "qa": qa,
            "kva": kva, "kv": kv, "E": E, "U": U}


def ethos_heads(model, i) -> dict:
    """The same for our backbones (ethos.models.attention): MHA.qkv rows [W_q; W_k; W_v]; MLA.qkv_a rows
    [W_qa (or W_q); W_kva; W_kr], kv_b rows per head (d_k + d_v); MLA-o's W_O = W_OA W_OB."""
    from ethos.models.attention import MLA, MLAO

    block = model.trunk.blocks[i]
    a, g = block.attn, block.attn_norm.weight.double()
    if isinstance(a, MLA):
        H, dk, dv = a.n_heads, a.d_k, a.d_v
        q_in, r_kv, _ = a.split
        down = (a.qkv_a.weight.double() * g).T
        if a.q_b is not None:
            W_q, qa = (a.q_b.weight.double() * a.q_norm.weight.double()).T, down[:, :q_in]
        else:
            W_q, qa = down[:, :q_in], None
        W_kv = (a.kv_b.weight.double() * a.kv_norm.weight.double()).T
        q = [W_q[:, h * a.d_qk:h * a.d_qk + dk] for h in range(H)]
        k = [W_kv[:, h * (dk + dv):h * (dk + dv) + dk] for h in range(H)]
        v = [W_kv[:, h * (dk + dv) + dk:(h + 1) * (dk + dv)] for h in range(H)]
        kva, kv = down[:, q_in:q_in + r_kv], list(range(H))
    else:
        H, G, dv = a.n_heads, a.n_kv_heads, a.head_dim
        W = (a.qkv.weight.double() * g).T
        head = lambda start, j: W[:, start + j * dv:start + (j + 1) * dv]  # noqa: E731
        q, k, v = [head(0, h) for h in range(H)], [head(H * dv, j) for j in range(G)], [
            head((H + G) * dv, j) for j in range(G)]
        qa = kva = None
        kv = [h // (H // G) for h in range(H)]
    W_o = (a.o_a.weight.double().T @ a.o_b.weight.double().T) if isinstance(a, MLAO) else a.out.weight.double().T
    o = [W_o[h * dv:(h + 1) * dv] for h in range(H)]
    E = model.embed.weight.double()
    U = (model.embed.weight.double() * model.trunk.norm.weight.double()).T
    return {"q": q, "k": [k[kv[h]] for h in range(H)], "v": [v[kv[h]] for h in range(H)], "o": o, "qa": qa,
            "kva": kva, "kv": kv, "E": E, "U": U}


def residual(m: dict, h: int) -> tuple:
    """(q, k, v) of head h in residual coordinates: MLA's down-projections in front."""
    q = m["q"][h] if m["qa"] is None else m["qa"] @ m["q"][h]
    k = m["k"][h] if m["kva"] is None else m["kva"] @ m["k"][h]
    v = m["v"][h] if m["kva"] is None else m["kva"] @ m["v"][h]
    return q, k, v


def ethos_decoder(variant: str, vocab: int = 96, seed: int = 0, overrides=()):
    from ethos.config import instantiate
    from ethos.models.decoder import Decoder

    cfg = compose([f"model={variant}", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.rope_dims=8",
                   *overrides])
    torch.manual_seed(seed)
    model = Decoder(instantiate(cfg.model, _convert_="object"), vocab)
    with torch.no_grad():  # random everywhere (init zeroes or repeats some), norm gains around 1
        for name, p in model.named_parameters():
            p.copy_(0.5 + torch.rand_like(p) if "norm" in name else torch.randn_like(p) * 0.1)
    return model.eval()


ETHOS_VARIANTS = {"mha": ("mha", []), "gqa": ("gqa", ["model.attn.n_kv_heads=2"]), "mla": ("mla", []),
                  "mla_o": ("mla_o", []), "mla_no_q_latent": ("mla", ["model.attn.q_latent=null"])}


def ethos_source(model, name="model"):
    return EthosSource(name, torch.float64, model=model)


# ---- 1. circuits equal brute force ----

def assert_circuits(src, hand, n_layers: int) -> None:
    for i in range(n_layers):
        w = src.read(i, circuits.READ)
        m = hand(i)
        pattern, message = circuits.dense(circuits.pattern_factors(w)), circuits.dense(circuits.message_factors(w))
        res_p = circuits.dense(circuits.pattern_factors(w, residual=True))
        res_m = circuits.dense(circuits.message_factors(w, residual=True))
        for h in range(w.n_heads):
            torch.testing.assert_close(pattern[h], m["q"][h] @ m["k"][h].T, **F64, msg=f"layer {i} head {h} W_QK")
            torch.testing.assert_close(message[h], m["v"][h] @ m["o"][h], **F64, msg=f"layer {i} head {h} W_VO")
            q, k, v = residual(m, h)
            torch.testing.assert_close(res_p[h], q @ k.T, **F64, msg=f"layer {i} head {h} W_QK residual")
            torch.testing.assert_close(res_m[h], v @ m["o"][h], **F64, msg=f"layer {i} head {h} W_VO residual")


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_pattern_and_message_matrices_equal_hand_built(name, tmp_path):
    model = HF_MODELS[name]()
    src = open_source(str(save(model, tmp_path / name)), dtype=torch.float64)
    assert_circuits(src, lambda i: hf_heads(model, i), model.config.num_hidden_layers)


@pytest.mark.parametrize("variant", list(ETHOS_VARIANTS))
def test_ethos_pattern_and_message_matrices_equal_hand_built(variant):
    name, overrides = ETHOS_VARIANTS[variant]
    model = ethos_decoder(name, overrides=overrides)
    assert_circuits(ethos_source(model), lambda i: ethos_heads(model, i), 2)


def brute_tables(m: dict, top: int) -> dict:
    """Per head, from dense matrices: the norms, the copying score from the eigenvalues of the V x V OV circuit,
    and the top pairs of the V x V pattern and message circuits."""
    out = []
    for h in range(len(m["q"])):
        qk, vo = m["q"][h] @ m["k"][h].T, m["v"][h] @ m["o"][h]
        q, k, v = residual(m, h)
        lam = torch.linalg.eigvals(m["E"] @ v @ m["o"][h] @ m["U"])
        pattern_vv = m["E"] @ q @ k.T @ m["E"].T
        message_vv = m["E"] @ v @ m["o"][h] @ m["U"]
        s_qk, s_vo = torch.linalg.svdvals(qk), torch.linalg.svdvals(vo)
        out.append({"qk_fro": qk.norm(), "qk_sigma1": s_qk[0], "vo_fro": vo.norm(), "vo_sigma1": s_vo[0],
                    "qk_rank": torch.linalg.matrix_rank(qk), "vo_rank": torch.linalg.matrix_rank(vo),
                    "copying": lam.real.sum() / lam.abs().sum(),
                    "pattern": pattern_vv.flatten().topk(top), "message": message_vv.flatten().topk(top),
                    "V": pattern_vv.shape[1]})
    return out


def assert_tables(out, hand, n_layers: int, top: int) -> None:
    rows = list(csv.DictReader(open(out / "heads.csv")))
    pairs = {kind: list(csv.DictReader(open(out / f"{kind}_pairs.csv"))) for kind in ("pattern", "message")}
    for i in range(n_layers):
        for h, ref in enumerate(brute_tables(hand(i), top)):
            row = next(r for r in rows if int(r["layer"]) == i and int(r["head"]) == h)
            for key in ("qk_fro", "qk_sigma1", "vo_fro", "vo_sigma1", "copying"):
                assert float(row[key]) == pytest.approx(float(ref[key]), rel=1e-8, abs=1e-12), (i, h, key)
            assert int(row["qk_rank"]) == int(ref["qk_rank"]) and int(row["vo_rank"]) == int(ref["vo_rank"])
            for kind in ("pattern", "message"):
                got = [r for r in pairs[kind] if int(r["layer"]) == i and int(r["head"]) == h]
                values, flat = ref[kind]
                assert [float(r["value"]) for r in got] == pytest.approx(values.tolist(), rel=1e-8)
                assert [(int(r["row_id"]), int(r["col_id"])) for r in got] == [
                    (int(f) // ref["V"], int(f) % ref["V"]) for f in flat], (i, h, kind)


@pytest.mark.parametrize("name", ["llama", "deepseek_q_latent"])
def test_hf_head_table_equals_brute_force(name, tmp_path):
    model = HF_MODELS[name]()
    path = save(model, tmp_path / name)
    heads.analyse(str(path), tmp_path / "out", top=7, progress=False, plots=False)
    assert_tables(tmp_path / "out", lambda i: hf_heads(model, i), model.config.num_hidden_layers, 7)


@pytest.mark.parametrize("variant", ["gqa", "mla_o"])
def test_ethos_head_table_equals_brute_force(variant, tmp_path, monkeypatch):
    name, overrides = ETHOS_VARIANTS[variant]
    model = ethos_decoder(name, overrides=overrides)
    monkeypatch.setattr(heads, "open_source", lambda *a, **k: ethos_source(model))
    heads.analyse("model", tmp_path / "out", top=5, progress=False, plots=False)
    assert_tables(tmp_path / "out", lambda i: ethos_heads(model, i), 2, 5)


def test_top_pairs_blockwise_equals_dense_topk():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(250, 6, generator=g, dtype=torch.float64)
    full = (a @ b.T).flatten().topk(40)
    for max_elems in (1, 250 * 7, 10 ** 9):  # one row per block, 7 rows, everything at once
        v, r, c = circuits.top_pairs(a, b, 40, max_elems=max_elems)
        torch.testing.assert_close(v, full.values)
        assert (r * 250 + c).tolist() == full.indices.tolist()


# ---- 2. planted heads ----

def test_planted_copying_head_ranks_first():
    """Head 2 of layer 1 writes back what it reads, through an orthonormal Q: W_VO = Q Qᵀ, so E W_VO U = E Q Qᵀ Eᵀ
    (tied, unit gains) is positive semi-definite and its copying score is 1; random heads score near 0."""
    model = ethos_decoder("mha")
    attn = model.trunk.blocks[1].attn
    H, d_h, d = attn.n_heads, attn.head_dim, 64
    with torch.no_grad():
        model.trunk.blocks[1].attn_norm.weight.fill_(1.0)
        model.trunk.norm.weight.fill_(1.0)
        Q = torch.linalg.qr(torch.randn(d, d_h, dtype=torch.float64))[0].float()
        v_rows = slice((H + H) * d_h + 2 * d_h, (H + H) * d_h + 3 * d_h)  # W_v of head 2: rows of qkv
        attn.qkv.weight[v_rows] = Q.T
        attn.out.weight[:, 2 * d_h:3 * d_h] = Q
    src = ethos_source(model)
    vocab = heads.load_vocab(src, None, False, None)
    scores = {(i, h): r["copying"] for i in range(2) for r in heads.layer_heads(src, i, vocab)["heads"]
              for h in [r["head"]]}
    best = max(scores, key=scores.get)
    assert best == (1, 2) and scores[best] == pytest.approx(1.0, abs=1e-9), scores
    assert max(abs(s) for k, s in scores.items() if k != best) < 0.7


def test_planted_previous_token_head_is_found_by_its_pattern():
    """Learned positions on one-hot directions, and head 1 of layer 0 with W_Q e_t -> u_t, W_K e_s -> u_{s+1}: its
    query at t scores the key at t - 1 alone. The attention view ranks it first by previous-token mass."""
    T = 12
    model = ethos_decoder("mha", overrides=["model.rope_dims=0", "model.learned_pos=true", "model.max_seq_len=16"])
    attn = model.trunk.blocks[0].attn
    d_h = attn.head_dim
    with torch.no_grad():
        model.embed.weight.mul_(0.02)
        model.pos_embed.weight.zero_()
        model.pos_embed.weight[:T, :T] = torch.eye(T)
        model.trunk.blocks[0].attn_norm.weight.fill_(1.0)
        q_rows, k_rows = slice(d_h, 2 * d_h), slice(4 * d_h + d_h, 4 * d_h + 2 * d_h)  # head 1's W_q and W_k rows
        attn.qkv.weight[q_rows] = 0
        attn.qkv.weight[k_rows] = 0
        for t in range(T):
            attn.qkv.weight[d_h + t, t] = 1.0           # q_t = u_t
            if t + 1 < d_h:
                attn.qkv.weight[4 * d_h + d_h + t + 1, t] = 1.0  # k_s = u_{s+1}
    ids = torch.randint(0, 96, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    attn_w, _, _ = lens.run(ethos_source(model), ids)
    rows = lens.attention_rows(attn_w)
    best = max(rows, key=lambda r: r["prev_mass"])
    assert (best["layer"], best["head"]) == (0, 1) and best["prev_mass"] > 0.9, best
    p = attn_w[0][1]  # the pattern itself: every query after the first looks at its predecessor
    assert (p[1:].argmax(-1) == torch.arange(T - 1)).all()


# ---- message sharing ----

def test_gqa_heads_of_one_group_read_one_subspace():
    """GQA ties the messages' read side: heads of a group share W_V, so their read subspaces coincide (overlap 1),
    while heads of different groups overlap about as random subspaces do; the write sides are each head's own."""
    model = ethos_decoder("gqa", overrides=["model.attn.n_kv_heads=2"])
    src = ethos_source(model)
    rows = heads.layer_heads(src, 0, None)["sharing"]
    for r in rows:
        if r["side"] == "read" and r["same_group"]:
            assert r["overlap"] == pytest.approx(1.0, abs=1e-10)
        if r["side"] == "read" and not r["same_group"]:
            assert r["overlap"] < 0.6
    # overlaps against the principal angles computed densely
    w = src.read(0, circuits.READ)
    vo = circuits.dense(circuits.message_factors(w))
    def basis(m, side):
        return torch.linalg.svd(m if side == "read" else m.T)[0][:, :16]

    for r in rows:
        cos = torch.linalg.svdvals(basis(vo[r["head_a"]], r["side"]).T @ basis(vo[r["head_b"]], r["side"]))
        assert r["overlap"] == pytest.approx(float(cos.pow(2).mean()), abs=1e-9)


# ---- the tool: CLI, text, resume ----

def test_cli_writes_every_table_and_resumes(tmp_path, capsys):
    model = llama(tie=True)
    path = save(model, tmp_path / "llama")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    out = tmp_path / "out"
    text = " ".join(f"w{i}" for i in (5, 9, 5, 9, 17, 3, 5))
    heads.main([str(path), "--out", str(out), "--top", "3", "--text", text])
    for f in ("heads.csv", "pattern_pairs.csv", "message_pairs.csv", "sharing.csv", "sharing_summary.csv",
              "heads.json", "attention.csv", "lens.csv", "heads.png", "sharing_layer_000.png",
              "attention_layer_001.png", "lens.png"):
        assert (out / f).is_file(), f
    pairs = list(csv.DictReader(open(out / "pattern_pairs.csv")))
    assert pairs[0]["row_token"] == f"w{pairs[0]['row_id']}"
    first = (out / "heads.csv").read_text()
    (out / "layers" / "layer_001.json").unlink()
    heads.main([str(path), "--out", str(out), "--top", "3"])
    assert (out / "heads.csv").read_text() == first
    # the lens at the last layer is the model's own output distribution
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    ids = torch.tensor([[int(t[1:]) for t in text.split()]])
    with torch.no_grad():
        probs = model(ids).logits[0].double().softmax(-1)
        hf_attn = model(ids, output_attentions=True).attentions
    lens_rows = [r for r in csv.DictReader(open(out / "lens.csv")) if int(r["layer"]) == 2]
    for r in lens_rows:
        p = probs[int(r["position"])]
        assert float(r["top1_prob"]) == pytest.approx(float(p.max()), rel=1e-5)
        assert r["top1_token"] == f"w{int(p.argmax())}"
    attention = list(csv.DictReader(open(out / "attention.csv")))
    assert len(attention) == 2 * 4
    for r in attention:
        p = hf_attn[int(r["layer"])][0, int(r["head"])]
        assert float(r["first_mass"]) == pytest.approx(float(p[1:, 0].mean()), rel=1e-5)


def test_bad_arguments_exit_2_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        heads.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    with pytest.raises(SystemExit) as e:
        heads.main([str(tmp_path), "--out", str(tmp_path / "o"), "--top", "0"])
    assert e.value.code == 2 and "--top=0" in capsys.readouterr().err


def test_results_json_is_plain(tmp_path):
    model = qwen2()
    path = save(model, tmp_path / "q")
    tables = heads.analyse(str(path), tmp_path / "out", progress=False, plots=False, token_circuits_on=False)
    assert not tables["pattern_pairs"] and all(r["copying"] is not None for r in tables["heads"])
    assert json.loads((tmp_path / "out" / "heads.json").read_text())["heads"] == json.loads(json.dumps(
        tables["heads"]))


def readme_commands(module: str) -> list[list[str]]:
    """The `python -m ethos.analysis.<module>` commands of the README's code blocks."""
    import re
    import shlex

    from conftest import ROOT

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [shlex.split(m.group(1).split("#")[0]) for block in blocks
            for m in re.finditer(rf"^python -m ethos\.analysis\.{module} (.*)$", block, flags=re.M)]


@pytest.mark.slow
def test_readme_commands_run(mha_run, tmp_path, monkeypatch):
    """Each documented heads command, from a directory where its SOURCE exists: the README's pretraining run (our
    tiny MHA encoder) or, for a hub repo id, a tiny Qwen3 stand-in served by the local hub of the spectra tests."""
    import shutil
    from pathlib import Path

    import transformers
    from test_spectra import LocalHub

    commands = readme_commands("heads")
    assert commands, "README documents no heads command"
    torch.manual_seed(5)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))
    LocalHub(monkeypatch, {"Qwen/Qwen3-0.6B": save(randomize_norms(qwen3), tmp_path / "hub")})
    monkeypatch.chdir(tmp_path)
    for args in commands:
        source = Path(args[0])
        if not source.is_absolute() and len(source.parts) > 2:
            shutil.copytree(mha_run, source, dirs_exist_ok=True)
        heads.main(args)
        out = Path(args[args.index("--out") + 1])
        assert (out / "heads.csv").is_file() and (out / "heads.png").is_file(), args
        if "--text" in args:
            assert (out / "lens.png").is_file() and (out / "attention_layer_000.png").is_file()
