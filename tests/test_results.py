"""The study table (ethos.results): a real 2 variants x 2 seeds multirun with one failing job, and the
table's numbers checked against the run dirs they came from; then groups named by what tells them apart, on run
dirs written here."""

import json
import math
import os
import subprocess
import sys

import lightning as L
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from ethos.results.__main__ import main as results_main


class FailFor(L.Callback):
    """Raises at the start of training for one (attention, seed): the deliberately failing job."""

    def __init__(self, attn: str, seed: int, fail_attn: str, fail_seed: int):
        self.fail = attn.endswith(fail_attn) and seed == fail_seed

    def on_train_start(self, trainer, pl_module):
        if self.fail:
            raise RuntimeError("deliberate failure (tests/test_results.py)")


@pytest.fixture(scope="module")
def sweep(cache_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    args = ["-m", "model=mha,mla", "seed=1,2", "debug=tiny", "logger=csv", "print_config=false",
            "trainer.max_steps=4", "trainer.val_check_interval=2", f"paths.log_dir={tmp}",
            "+callbacks.fail._target_=test_results.FailFor", "+callbacks.fail.attn=${model.attn._target_}",
            "+callbacks.fail.seed=${seed}", "+callbacks.fail.fail_attn=.MLA", "+callbacks.fail.fail_seed=2",
            # the study protocol: each pretraining job then fine-tunes its run (a few steps here)
            "finetune_after=docstrings", 'finetune_after.overrides=["optim.lr=1e-3","trainer.max_epochs=-1",'
            '"trainer.max_steps=6","trainer.val_check_interval=3"]']
    env = {**os.environ, "ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "tests")}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]  # a failed job does not fail the sweep
    return tmp / "train" / "multiruns"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multirun_writes_its_table_with_the_failure_marked(sweep):
    runs = pd.read_csv(sweep / "results.csv")
    assert len(runs) == 4
    failed = runs[runs["status"] == "failed"]
    assert list(zip(failed["variant"], failed["seed"])) == [("mla", 2)]
    assert "deliberate failure" in failed["error"].iloc[0]
    assert (runs[runs["status"] != "failed"]["status"] == "done").all()
    for _, row in runs[runs["status"] == "done"].iterrows():  # every number read back from its run dir
        run = sweep / row["run"]
        logged = pd.read_csv(run / "csv" / "metrics.csv")
        val = logged["val/loss"].dropna()
        assert row["val_loss_best"] == pytest.approx(val.min()) and row["val_loss_final"] == pytest.approx(
            val.iloc[-1])
        bpb = logged["val/bpb"].dropna()  # the masked LM's bits per byte, logged beside val/loss
        assert len(bpb) == len(val) and row["val_bpb_final"] == pytest.approx(bpb.iloc[-1])
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        n_params = sum(v.numel() for k, v in ckpt["state_dict"].items())
        assert row["params_total"] == n_params  # no tied or shared weights counted twice in the state dict
        assert row["steps"] == 4
    groups = pd.read_csv(sweep / "results_groups.csv").set_index("variant")
    assert groups.loc["mha", "runs"] == 2 and groups.loc["mha", "done"] == 2
    assert groups.loc["mla", "runs"] == 2 and groups.loc["mla", "done"] == 1
    mha = runs[(runs["variant"] == "mha")]["val_loss_final"]
    assert groups.loc["mha", "val_loss_final_mean"] == pytest.approx(mha.mean())
    assert groups.loc["mha", "val_loss_final_std"] == pytest.approx(mha.std())  # sample std over seeds
    assert math.isnan(groups.loc["mla", "val_loss_final_std"])  # one finished run: no spread
    # finetune_after: each finished run was fine-tuned in <run>/finetune/docstrings, from its own checkpoint; its
    # accuracy is on the run's row (the fine-tune is not a row of its own), the failed run has none
    for _, row in runs.iterrows():
        ft = sweep / row["run"] / "finetune" / "docstrings"
        if row["status"] == "done":
            acc = pd.read_csv(ft / "csv" / "metrics.csv")["val/acc"].dropna()
            assert row["downstream_acc"] == pytest.approx(acc.max())
            cfg = (ft / "config_resolved.yaml").read_text()
            assert f"pretrained: {sweep / row['run']}" in cfg and "SequenceClassifier" in cfg
            assert torch.load(ft / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
        else:
            assert not ft.exists() and math.isnan(row["downstream_acc"])
    md = (sweep / "results.md").read_text()
    assert "failed" in md and "±" in md
    assert (sweep / "val_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_command_line_rewrites_the_table_and_filters_a_multirun(sweep, tmp_path, capsys):
    results_main([str(sweep), "--no-wandb"])
    assert "4 runs" in capsys.readouterr().out
    results_main([str(sweep), "--group", "someone else's multirun", "--no-wandb"])
    assert len(pd.read_csv(sweep / "results.csv")) == 0
    results_main([str(sweep), "--no-wandb"])
    assert len(pd.read_csv(sweep / "results.csv")) == 4
    with pytest.raises(SystemExit):
        results_main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()  # nothing run yet: empty tables, not an error
    results_main([str(tmp_path / "empty"), "--no-wandb"])
    assert "0 runs" in (tmp_path / "empty" / "results.md").read_text()


def bert_sized_tokenizer(path):
    """A WordPiece tokenizer with exactly BERT uncased's 30522 entries (characters and their ## pieces, then
    placeholders), saved in the transformers layout: what `data.tokenizer=bert-base-uncased` gives a model."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + [f"##{c}" for c in chars]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    assert len(fast) == 30522
    return path


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_table_reports_the_documented_parameter_counts(cache_dir, tmp_path):
    """The MHA encoder at the reference study's sizes with a BERT-sized vocabulary: the table's counts are
    docs/param_counts.md's (total 14,138,938) and the attention count is 4 d^2 per layer."""
    from conftest import compose
    from ethos.results import gather
    from ethos.study import train

    tok = bert_sized_tokenizer(tmp_path / "bert_sized")
    run = tmp_path / "study" / "mha"
    train(compose(["experiment=subspace_encoder_mha", "data.offline=true", f"data.tokenizer={tok}", "data.batch_size=4",
                   "trainer=cpu", "trainer.max_steps=1", "trainer.val_check_interval=1",
                   "trainer.limit_val_batches=1", "validate_first=false", "logger=csv", "print_config=false"],
                  output_dir=run))
    doc = (ROOT / "docs" / "param_counts.md").read_text()
    assert "| MHA (rope 32)                 | 14,138,938 |" in doc
    row = gather(tmp_path / "study").set_index("run").loc["mha"]
    assert row["params_total"] == 14_138_938
    assert row["params_attention"] == 6 * 4 * 256 * 256
    assert row["params_non_embedding"] == 14_138_938 - 30522 * 256


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_swept_task_name_gets_its_table_where_its_runs_are(cache_dir, tmp_path):
    """Each experiment names its own run dirs (task_name): sweeping experiments, the runs are not in the
    multirun's default dir, and the table must follow them there; with the default logger (W&B) its numbers
    come from the CSV log kept beside it."""
    args = ["-m", "task_name=alpha,beta", "debug=tiny", "logger=wandb", "print_config=false", "trainer.max_steps=2",
            "trainer.val_check_interval=2", f"paths.log_dir={tmp_path}"]  # the default logger: W&B (+ CSV)
    env = {**os.environ, "ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("alpha", "beta"):
        runs = pd.read_csv(tmp_path / name / "multiruns" / "results.csv")
        assert list(runs["status"]) == ["done"] and runs["val_loss_final"].notna().all()
        assert runs["params_total"].notna().all()
    assert not (tmp_path / "train" / "multiruns" / "results.csv").exists()  # no empty table where nothing ran


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_fine_tune_is_marked_on_itself_and_leaves_its_run_done(cache_dir, tmp_path):
    # a protocol that breaks at its first step: 3 docstring kinds, a head for 2 classes
    args = ["-m", "seed=1", "debug=tiny", "logger=csv", "print_config=false", "trainer.max_steps=2",
            "trainer.val_check_interval=2", f"paths.log_dir={tmp_path}", "finetune_after=docstrings",
            'finetune_after.overrides=["data.num_classes=2","trainer.max_epochs=-1","trainer.max_steps=2"]']
    env = {**os.environ, "ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]  # the sweep goes on
    sweep = tmp_path / "train" / "multiruns"
    (run,) = [d for d in sweep.iterdir() if d.is_dir()]
    ft = json.loads((run / "finetune" / "docstrings" / "status.json").read_text())
    assert ft["status"] == "failed" and "data.num_classes=2: the train split has labels 0..2" in ft["error"]
    runs = pd.read_csv(sweep / "results.csv")
    assert list(runs["status"]) == ["done"] and runs["downstream_acc"].isna().all()


EXPERIMENTS = ["subspace_encoder_mha", "subspace_encoder_mla", "subspace_encoder_mla_o"]
PROTOCOL = ("finetune_after.overrides=[" + ", ".join(  # as typed: spaces and commas inside the brackets
    f'"{o}"' for o in ["optim.lr=2e-5", "optim.weight_decay=0.01", "data.batch_size=16", "data.eval_batch_size=64",
                       "trainer.max_epochs=3", "trainer.max_steps=-1", "trainer.val_check_interval=500",
                       "trainer.gradient_clip_val=1.0", "task.pooling=cls", "task.freeze=false",
                       "model.dropout=0.1", "callbacks.model_checkpoint.save_top_k=1",
                       "data.path=/scratch/datasets/glue", "data.tokenizer=/scratch/models/bert-base-uncased"]) + "]")


def write_run(run, overrides: list[str], seed: int, losses: list[float], model: str) -> None:
    """A run dir as a multirun job leaves it: Hydra's record, the resolved config, the CSV log, status.json;
    and its fine-tune (finetune_after) inside it, composed in-process (no Hydra record)."""
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"overrides": {"task": overrides}, "runtime": {"choices": {"model": model}},
                              "job": {"config": {"override_dirname": {"exclude_keys": ["logger", "run_name"]}}}}},
                   run / ".hydra" / "hydra.yaml")
    ft = run / "finetune" / "sst2"
    bpb = [x / (4 * math.log(2)) for x in losses]  # as if 4 bytes per token
    for d, cfg, log in ((run, {"seed": seed}, {"val/loss": losses, "val/bpb": bpb}),
                        (ft, {"seed": seed, "pretrained": str(run)}, {"val/acc": [0.5, 0.8]})):
        (d / "csv").mkdir(parents=True)
        OmegaConf.save({"model": {"attn": {}}, **cfg}, d / "config_resolved.yaml")
        pd.DataFrame({"step": range(len(next(iter(log.values())))), **log}).to_csv(d / "csv" / "metrics.csv",
                                                                                  index=False)
        (d / "status.json").write_text(json.dumps({"status": "done", "group": "study"}))


def test_groups_are_named_by_what_differs_and_what_all_share_is_said_once(tmp_path):
    from ethos.results import write_results
    from ethos.results.plots import val_curves

    for i, experiment in enumerate(EXPERIMENTS):
        for seed in (1, 2):
            overrides = [f"experiment={experiment}", f"seed={seed}", "data.batch_size=32", "finetune_after=sst2",
                         PROTOCOL, "logger=csv"]
            write_run(tmp_path / f"run{i}{seed}", overrides, seed, [5.0 - i, 4.0 - i - seed / 10],
                      experiment.removeprefix("subspace_encoder_"))
    df, groups = write_results(tmp_path, use_wandb=False)
    assert len(df) == 6  # the fine-tunes are their runs' downstream_acc, not rows
    assert sorted(groups["group"]) == [f"experiment={e}" for e in EXPERIMENTS]
    assert list(groups["runs"]) == [2, 2, 2] and (df["downstream_acc"] == 0.8).all()
    bpb = groups.set_index("group")["val_bpb_final_mean"]  # bits per byte, beside the loss
    for i, experiment in enumerate(EXPERIMENTS):
        finals = [(4.0 - i - seed / 10) / (4 * math.log(2)) for seed in (1, 2)]
        assert bpb[f"experiment={experiment}"] == pytest.approx(sum(finals) / 2)
    assert (df["val_bpb_best"] == df["val_bpb_final"]).all()
    md = (tmp_path / "results.md").read_text()
    assert "val_bpb_best" in md and "val_bpb_final" in md
    assert md.count("finetune_after.overrides=") == 1 and md.count("data.batch_size=32") == 1
    assert "logger=csv" not in md  # not part of the run dir's name: not a difference between runs either
    for experiment in EXPERIMENTS:
        assert f"| experiment={experiment} " in md
    fig = val_curves(df, tmp_path)
    fig.canvas.draw()
    (legend,) = fig.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(groups["group"])
    (ax,) = fig.axes
    caption = ax.get_title(loc="left")
    assert "finetune_after.overrides=" in caption and "experiment=" not in caption
    box = fig.bbox
    for artist in (legend, ax, ax._left_title, fig._suptitle):  # everything inside the figure, nothing on another
        extent = artist.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, artist
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    assert not ax._left_title.get_window_extent().overlaps(fig._suptitle.get_window_extent())
