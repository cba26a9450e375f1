"""experiment=prompt_encoding: its four objectives at equal parameters (the encoder–decoder's closed form against the
decoder's module count) and equal training tokens, and one multirun that writes one table with the continuation
bits per byte, the probes and the downstream accuracy of every objective."""

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, run_cli
from ethos.checks import check
from ethos.config import CONF_DIR
from ethos.models.seq2seq import EncoderDecoder
from ethos.tasks.registry import backbone_for, task_target

OBJECTIVES = {"causal": "ethos.tasks.clm.CausalLM", "prefix_lm": "ethos.tasks.prefix_lm.PrefixLM",
              "mixture": "ethos.tasks.prefix_lm.PrefixLM", "seq2seq": "ethos.tasks.seq2seq.Seq2Seq"}
V = 8192


def params(objective: str) -> tuple[int, float]:
    cfg = compose(["experiment=prompt_encoding", f"prompt_objective={objective}"])
    model_cfg, _ = check(cfg)
    with torch.device("meta"):
        if objective.startswith("seq2seq"):
            sizes = {k: cfg.task.get(k) for k in ("encoder_layers", "decoder_layers", "cross_kv_heads")}
            m = EncoderDecoder(model_cfg, V, **sizes)
            assert EncoderDecoder.param_count(model_cfg, V, **sizes) == sum(p.numel() for p in m.parameters())
        else:
            m = backbone_for(cfg)(model_cfg).__class__(model_cfg, V)
    return sum(p.numel() for p in m.parameters()), m.flops_per_token(128, 32)


def test_objectives_at_equal_parameters_and_tokens():
    sweep = OmegaConf.load(CONF_DIR / "experiment" / "prompt_encoding.yaml").hydra.sweeper.params
    assert sweep["prompt_objective"].split(",") == list(OBJECTIVES)
    for objective, target in OBJECTIVES.items():
        cfg = compose(["experiment=prompt_encoding", f"prompt_objective={objective}"])
        assert task_target(cfg) == target
        assert (cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.max_steps) == (32, 128, 116)  # one pass
    decoder, decoder_flops = params("causal")
    seq2seq, seq2seq_flops = params("seq2seq")
    assert abs(seq2seq / decoder - 1) < 0.01  # equal parameters (the default)
    _, flops = params("seq2seq_flops")
    assert abs(flops / decoder_flops - 1) < abs(seq2seq_flops / decoder_flops - 1) < 0.05  # the equal-FLOPs option


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_multirun_writes_one_table(cache_dir, tmp_path):
    args = ["-m", "experiment=prompt_encoding", "debug=tiny", "logger=csv", "print_config=false",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.prompt_probes.docs=16",
            "callbacks.prompt_probes.probe_limit=200", 'finetune_after.overrides=["trainer.max_epochs=null",'
            '"trainer.max_steps=4","trainer.val_check_interval=4"]', f"paths.log_dir={tmp_path}"]
    res = run_cli(args, tmp_path, env={"ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline"}, timeout=860)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "prompt_encoding" / "multiruns" / "results.csv")
    assert len(runs) == 4 and (runs["status"] == "done").all(), runs[["run", "status", "error"]]
    assert sorted(runs["task"]) == ["clm", "mixture", "prefix_lm", "seq2seq"]
    for col in ("val_bpb_final", "prompt_bpb", "prompt_help_bpb", "probe_acc", "downstream_acc"):
        assert runs[col].notna().all(), col
    assert runs["probe_acc"].between(0, 1).all() and runs["downstream_acc"].between(0, 1).all()
    assert "prompt_help_bpb" in (tmp_path / "prompt_encoding" / "multiruns" / "results.md").read_text()
