"""experiment=ffn_ablation: its FFN points sit at equal active parameters per token (and one at equal total), and
one multirun writes one table with active parameters, peak memory and the expert layers' balance."""

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, run_cli
from ethos.checks import build_model_config, check
from ethos.config import CONF_DIR
from ethos.models.decoder import Decoder

POINTS = ["dense", "moe", "peer", "latent", "dense_wide"]


def ffn_counts(point: str) -> tuple[int, int]:
    """(total, active) parameters of one layer's FFN, from the module as the experiment builds it."""
    cfg = compose(["experiment=ffn_ablation", f"model/ffn=equal_active/{point}"])
    check(cfg)
    with torch.device("meta"):
        ffn = Decoder(build_model_config(cfg), vocab_size=1000).trunk.blocks[0].ffn
    total = sum(p.numel() for p in ffn.parameters())
    return total, ffn.active_params() if hasattr(ffn, "active_params") else total


def test_points_are_at_equal_active_parameters_and_one_at_equal_total():
    counts = {p: ffn_counts(p) for p in POINTS}
    dense_total, dense_active = counts["dense"]
    assert dense_total == dense_active == 3 * 256 * 1024
    for point in ("moe", "peer", "latent"):
        total, active = counts[point]
        assert abs(active / dense_active - 1) < 0.03, (point, active)
        assert total > 2 * active  # sparse: most of each expert layer rests for any one token
    assert abs(counts["dense_wide"][0] / counts["moe"][0] - 1) < 0.01  # the equal-total point
    sweep = OmegaConf.load(CONF_DIR / "experiment" / "ffn_ablation.yaml").hydra.sweeper.params
    assert sweep["model/ffn"].split(",") == [f"equal_active/{p}" for p in POINTS]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_multirun_writes_one_table(cache_dir, tmp_path):
    args = ["-m", "experiment=ffn_ablation", "debug=tiny", "logger=csv", "print_config=false", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "callbacks.throughput.window_size=2",
            f"paths.log_dir={tmp_path}"]
    res = run_cli(args, tmp_path, env={"ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline"}, timeout=560)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "ffn_ablation" / "multiruns" / "results.csv")
    assert len(runs) == 5 and (runs["status"] == "done").all(), runs[["run", "status", "error"]]
    for col in ("val_loss_final", "val_bpb_final", "tokens_per_sec", "params_total", "params_active",
                "peak_memory_gib"):
        assert runs[col].notna().all(), col
    experts = runs[~runs["run"].str.contains("dense")]
    assert experts["expert_usage"].between(0, 1).all() and (experts["params_active"] < experts["params_total"]).all()
    dense = runs[runs["run"].str.contains("dense")]
    assert dense["expert_usage"].isna().all() and (dense["params_active"] == dense["params_total"]).all()
    assert runs[runs["run"].str.contains("equal_active/moe")]["max_load"].ge(1).all()
    assert "params_active" in (tmp_path / "ffn_ablation" / "multiruns" / "results.md").read_text()
