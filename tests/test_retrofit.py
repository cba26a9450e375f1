"""The shared-output-subspace retrofit (ethos.analysis.retrofit): errors against the SVD identities, the
activation-aware truncation against plain truncation on its own objective, and the MLA-o run it writes,
loaded by a fine-tune and by continued pretraining."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_spectra import qwen, save
from test_train import metrics

from conftest import compose
from ethos import checkpoint
from ethos.analysis.lowrank import break_even
from ethos.analysis.retrofit import main, retrofit
from ethos.errors import ConfigError
from ethos.pretrained import load_task
from ethos.study import train

PRE = ["debug=tiny", "model=mla", "logger=csv", "print_config=false", "trainer.max_steps=30",
       "trainer.val_check_interval=30"]




def stacked_w_o(state: dict, layer: int) -> torch.Tensor:
    """W_O of a layer straight from the checkpoint: out.weight is (d, H*d_v), row vectors x W_O."""
    return state[f"model.trunk.blocks.{layer}.attn.out.weight"].double().T


@pytest.mark.slow
def test_errors_are_the_svd_tails_and_activation_aware_wins_on_its_objective(mla_run, tmp_path):
    report = retrofit(str(mla_run), [1, 4, 16, 64], tmp_path, activation_aware=True, calib_batches=4)
    df = pd.DataFrame(report["rows"])
    state = checkpoint.load(mla_run / "checkpoints" / "last.ckpt")["state_dict"]
    for (layer, rank), row in df[df["method"] == "plain"].set_index(["layer", "rank"]).iterrows():
        s = torch.linalg.svdvals(stacked_w_o(state, layer))  # Eckart-Young: the best rank-r error is the tail
        assert row["weight_rel_error"] == pytest.approx(math.sqrt(float((s[rank:] ** 2).sum() / (s ** 2).sum())),
                                                        rel=1e-9, abs=1e-12)
        assert row["params_factored"] == rank * sum(stacked_w_o(state, layer).shape)
    plain = df[df["method"] == "plain"].set_index(["layer", "rank"])
    aware = df[df["method"] == "activation"].set_index(["layer", "rank"])
    # each minimises its own error: activation-aware the output error, plain the weight error
    assert (aware["output_rel_error"] <= plain["output_rel_error"] + 1e-9).all()
    assert (plain["weight_rel_error"] <= aware["weight_rel_error"] + 1e-9).all()
    assert (aware["output_rel_error"] < plain["output_rel_error"] - 1e-4).any()  # and it matters somewhere
    assert (aware.xs(64, level="rank")["output_rel_error"] < 1e-6).all()  # full rank: exact
    assert (plain.xs(64, level="rank")["weight_rel_error"] < 1e-9).all()
    assert {p.name for p in tmp_path.iterdir()} >= {"retrofit.csv", "retrofit.md", "retrofit.png", "retrofit.json"}
    assert df["break_even_rank"].iloc[0] == break_even(64, 64) == 32


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_written_mla_o_runs_load_in_a_fine_tune_and_in_continued_pretraining(mla_run, tmp_path, capsys):
    out = tmp_path / "retro"
    report = retrofit(str(mla_run), [8, 64], out, activation_aware=True, calib_batches=4, write=[8, 64],
                      evaluate=True, val_batches=1000)
    loss = report["val_loss"]
    # full rank reproduces the model: the factors are in the right places
    assert loss["plain r=64"] == pytest.approx(loss["original"], rel=1e-5)
    assert loss["activation r=64"] == pytest.approx(loss["original"], rel=1e-4)
    assert loss["plain r=8"] > loss["original"]
    with capsys.disabled():  # reported, not asserted: which truncation loses less at a reduced rank
        print(f"\nretrofit r=8 of 64, val loss: original {loss['original']:.4f}, plain SVD {loss['plain r=8']:.4f}, "
              f"activation-aware {loss['activation r=8']:.4f}")
    src, _ = load_task(mla_run)
    full, ckpt = load_task(out / "mla_o_r64")
    assert type(full.model.trunk.blocks[0].attn).__name__ == "MLAO" and ckpt["ethos"]["model"]["attn"]["o_latent"] == 64
    ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(full.model(ids, torch.ones_like(ids, dtype=torch.bool)),
                                   src.model(ids, torch.ones_like(ids, dtype=torch.bool)), rtol=1e-4, atol=1e-5)
    # continued pretraining from the rank-8 weights: step 0 is the written model, then it trains
    r8 = out / "mla_o_r8"
    cont = tmp_path / "cont"
    train(compose([*PRE, "model=mla_o", "model.attn.o_latent=8", f"ckpt_path={r8 / 'checkpoints' / 'last.ckpt'}",
                   f"data.tokenizer={r8 / 'tokenizer'}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                   "trainer.limit_val_batches=1.0"], output_dir=cont))
    val = metrics(cont)["val/loss"]
    assert val[0][1] == pytest.approx(loss["plain r=8"], rel=1e-4)  # the step-0 validation
    assert checkpoint.load(cont / "checkpoints" / "last.ckpt")["global_step"] == 4
    # a fine-tune starts from it too (its tokenizer beside it)
    ft = tmp_path / "ft"
    train(compose(["task=finetune", "data=docstrings", "debug=tiny", "model=mla_o", "model.attn.o_latent=8",
                   f"pretrained={r8}", "logger=csv", "print_config=false", "trainer.max_steps=2",
                   "trainer.val_check_interval=2"], output_dir=ft))
    assert (ft / "checkpoints" / "last.ckpt").is_file()


def test_a_hf_checkpoint_gets_the_weight_table_and_one_line_errors(tmp_path, capsys):
    path = save(qwen(), tmp_path / "qwen")
    main([str(path), "--ranks", "2,8", "--out", str(tmp_path / "out")])
    df = pd.read_csv(tmp_path / "out" / "retrofit.csv")
    assert sorted(df["rank"].unique()) == [2, 8] and (df["method"] == "plain").all()
    with pytest.raises(ConfigError, match="--activation-aware, --write and --eval run the model"):
        retrofit(str(path), [2], tmp_path / "x", activation_aware=True)
    with pytest.raises(ConfigError, match="its rank is at most"):
        retrofit(str(path), [10_000], tmp_path / "x")
    capsys.readouterr()


@pytest.mark.slow
def test_the_readme_retrofit_command_runs(mla_run, tmp_path, monkeypatch):
    """The README's command, run where its SOURCE exists (our tiny MLA run at outputs/train/runs/mla)."""
    import re
    import shlex
    import shutil

    from conftest import ROOT

    lines = re.findall(r"^python -m ethos\.analysis\.retrofit (.*)$", (ROOT / "README.md").read_text(), flags=re.M)
    assert lines, "README documents no retrofit command"
    shutil.copytree(mla_run, tmp_path / "outputs" / "train" / "runs" / "mla")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = shlex.split(line.split("#")[0])
        main(args)
        out = Path(args[args.index("--out") + 1])
        assert (out / "retrofit.md").is_file()
        for r in args[args.index("--write") + 1].split(",") if "--write" in args else []:
            assert load_task(out / f"mla_o_r{r}")[1]["ethos"]["model"]["attn"]["o_latent"] == int(r)
