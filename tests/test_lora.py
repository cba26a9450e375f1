"""LoRA read head by head (issue 21): the adapters go on through HF peft and train, the merged model computes what
the peft model computes, a planted update on one head of one layer comes first with its exact ΔW norms, and the
same reading serves a full fine-tune as the difference of two checkpoints."""

import csv

import pytest
import torch
from test_heads import ethos_decoder, ethos_heads, llama
from test_spectra import save

from conftest import compose
from ethos.analysis import lora as reading
from ethos.analysis.ethos_runs import EthosSource
from ethos.errors import ConfigError
from ethos.models import lora


def dense_measures(w_before: torch.Tensor, w_after: torch.Tensor, r: int) -> dict:
    """From the d x d matrices: ||ΔW||_F, σ1, rank, and the shares of ||ΔW||² in W's column / row spaces."""
    delta = w_after - w_before
    u, s, vh = torch.linalg.svd(w_before)
    pu, pv = u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r]
    total = delta.pow(2).sum()
    return {"delta_fro": delta.norm(), "delta_sigma1": torch.linalg.svdvals(delta)[0],
            "rank": torch.linalg.matrix_rank(delta), "base_fro": w_before.norm(), "in_col": (pu @ delta).pow(2).sum() /
            total, "in_row": (delta @ pv).pow(2).sum() / total, "in_subspace": (pu @ delta @ pv).pow(2).sum() / total}


def read_all(before, after) -> list[dict]:
    return [r for i in range(after.n_layers) for r in reading.layer_updates(before, after, i)]


def test_planted_lora_update_on_one_head_comes_first_with_exact_norms():
    """A LoRA adapter on the fused qkv whose B is zero but on the rows of head 2's W_q in layer 1: ΔW_QK^2 =
    ΔW_Q Wᵀ_K there, nothing anywhere else; the reading ranks it first with the norms of the dense update."""
    model = ethos_decoder("mha")
    peft_model = lora.attach(model, lora.options({"r": 2, "alpha": 4.0, "targets": ["qkv"]}))
    qkv = peft_model.base_model.model.trunk.blocks[1].attn.qkv
    d_h = 16
    with torch.no_grad():
        torch.nn.init.normal_(qkv.lora_A["default"].weight)
        qkv.lora_B["default"].weight.zero_()
        qkv.lora_B["default"].weight[2 * d_h:3 * d_h] = torch.randn(d_h, 2) * 0.05
    before = EthosSource("base", torch.float64, model=lora.base(peft_model))
    after = EthosSource("lora", torch.float64, model=lora.merged(peft_model, torch.float64))
    rows = sorted(read_all(before, after), key=lambda r: -r["rel"])
    top = rows[0]
    assert (top["layer"], top["head"], top["kind"]) == (1, 2, "qk")
    assert all(r["rel"] < 1e-12 for r in rows[1:]), rows[1]
    # the dense update by hand: the adapter's (alpha / r) B A on head 2's q rows, the norm gain folded
    hand_before = ethos_heads(lora.base(peft_model), 1)
    scale = 4.0 / 2
    dq = (scale * qkv.lora_B["default"].weight.double()[2 * d_h:3 * d_h] @ qkv.lora_A["default"].weight.double()
          * model.trunk.blocks[1].attn_norm.weight.double()).T
    w_before = hand_before["q"][2] @ hand_before["k"][2].T
    w_after = (hand_before["q"][2] + dq) @ hand_before["k"][2].T
    ref = dense_measures(w_before, w_after, r=d_h)
    for key, value in ref.items():
        assert top[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key
    assert top["rank"] == 2


def test_the_peft_model_trains_only_its_adapters_and_merges_exactly():
    model = ethos_decoder("mla")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        before = model(ids)
    peft_model = lora.attach(model, lora.options({"r": 4}))  # null targets: every attention projection
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {"qkv_a", "q_b", "kv_b", "out"}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    merged = lora.merged(peft_model)
    assert not lora.is_lora(merged) and lora.is_lora(peft_model)
    with torch.no_grad():
        out = peft_model(ids)
        assert (out - before).abs().max() > 1e-3  # the adapters change the output ...
        torch.testing.assert_close(merged(ids), out, rtol=1e-5, atol=1e-5)  # ... and merge into the weights
        torch.testing.assert_close(lora.base(peft_model)(ids), before)  # unloaded: the pretrained model


def test_full_finetune_read_as_the_difference_of_two_checkpoints(tmp_path):
    """--base: a HF checkpoint against a copy whose o_proj changed on head 3's columns only (layer 0)."""
    model = llama()
    base_dir = save(model, tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 48:64] += torch.randn(64, 16) * 0.01
    tuned_dir = save(model, tmp_path / "tuned")
    rows = reading.analyse(str(tuned_dir), tmp_path / "out", base=str(base_dir), progress=False)
    top = max(rows, key=lambda r: r["rel"])
    assert (top["layer"], top["head"], top["kind"]) == (0, 3, "vo")
    assert sorted(r["rel"] for r in rows)[-2] < 1e-12
    ranked = list(csv.DictReader(open(tmp_path / "out" / "ranked.csv")))
    assert (int(ranked[0]["layer"]), int(ranked[0]["head"]), ranked[0]["kind"]) == (0, 3, "vo")
    assert (tmp_path / "out" / "updates.png").is_file() and (tmp_path / "out" / "layers.png").is_file()


def test_lora_targets_are_checked_before_any_data():
    from ethos.checks import check

    with pytest.raises(ConfigError, match=r"task.lora.targets=\['wq'\]: wq is not a projection.*valid: .*qkv"):
        check(compose(["task=finetune", "data=docstrings", "debug=tiny", "task.lora.r=4", "task.lora.targets=[wq]"]))
    with pytest.raises(ConfigError, match=r"task.lora.r=-1"):
        check(compose(["task=finetune", "data=docstrings", "debug=tiny", "task.lora.r=-1"]))
    check(compose(["task=finetune", "data=docstrings", "debug=tiny", "model=mla", "task.lora.r=4",
                   "task.lora.targets=[q_b,kv_b]"]))


def test_reading_a_run_that_is_not_lora_says_so(mha_run, tmp_path):
    with pytest.raises(ConfigError, match="not a LoRA fine-tune"):
        reading.analyse(str(mha_run), tmp_path / "out")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lora_finetune_trains_saves_merges_and_reads(mha_run, tmp_path, monkeypatch):
    """A LoRA fine-tune of the tiny pretrained encoder through train.py: its training loss falls, the adapter is
    saved, the merged backbone gives the peft model's outputs, both analysis tools read the run, and so do the
    README's commands."""
    import shutil
    from pathlib import Path

    import pandas as pd
    from test_heads import readme_commands

    from ethos.analysis import heads
    from ethos.pretrained import load_task
    from ethos.study import train

    ft = tmp_path / "ft"
    train(compose(["task=finetune", "data=docstrings", "debug=tiny", "logger=csv", "print_config=false",
                   "optim.lr=3e-3", "trainer.max_steps=60", "trainer.val_check_interval=60", "task.lora.r=4",
                   f"pretrained={mha_run}"], output_dir=ft))
    df = pd.read_csv(next(ft.glob("csv/**/metrics.csv"), None) or next(ft.rglob("metrics.csv")))
    loss = df["train/loss"].dropna().to_numpy()
    assert loss[-10:].mean() < loss[:10].mean() - 0.05, loss
    assert (ft / "adapter" / "adapter_model.safetensors").is_file()
    assert (ft / "adapter" / "adapter_config.json").is_file()
    task, _ = load_task(ft)
    assert lora.is_lora(task.model)
    ids = torch.randint(5, 100, (3, 24))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = task.model(ids, mask.bool())
        torch.testing.assert_close(lora.merged(task.model)(ids, mask.bool()), expected, rtol=1e-5, atol=1e-5)
    rows = reading.analyse(str(ft), tmp_path / "lora", progress=False)
    assert max(r["rel"] for r in rows) > 0 and (tmp_path / "lora" / "updates.png").is_file()
    tables = heads.analyse(str(ft), tmp_path / "heads", progress=False, plots=False, token_circuits_on=False)
    assert len(tables["heads"]) == 2 * 4
    # the README's commands, where their runs exist: the pretrained run, the LoRA run, a full fine-tune's stand-in
    readme = tmp_path / "readme"
    runs = readme / "outputs" / "train" / "runs"
    for name, run in (("default", mha_run), ("lora", ft), ("full", mha_run)):
        shutil.copytree(run, runs / name)
    monkeypatch.chdir(readme)
    commands = readme_commands("lora")
    assert len(commands) >= 2
    for args in commands:
        reading.main(args)
        assert (Path(args[args.index("--out") + 1]) / "updates.csv").is_file(), args
