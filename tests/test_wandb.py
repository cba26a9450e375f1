"""W&B: sweep agents' run ids, groups for multiruns and sweeps (offline: no account needed)."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, compose
from ethos.cli import name_multirun
from ethos.config import instantiate
from ethos.loggers import wandb_logger


@pytest.mark.slow
def test_agent_command_trains_under_the_agents_run_id(cache_dir, tmp_path):
    """The sweep file's command, expanded as `wandb agent` expands it, with the agent's environment."""
    spec = yaml.safe_load((ROOT / "sweeps" / "wandb_attention.yaml").read_text())
    params = {k: v["values"][0] for k, v in spec["parameters"].items()}
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": [sys.executable], "${program}": [spec["program"]],
              "${args_no_hyphens}": [f"{k}={v}" for k, v in params.items()]}
    cmd = [part for item in spec["command"] for part in macros.get(item, [item])]
    # test-sized: appended overrides win over the swept ones only where they overlap (none here)
    cmd += ["debug=tiny", "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2",
            f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "WANDB_SWEEP_ID": "sw33p", "WANDB_RUN_ID": "agentrun0001", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = next((tmp_path / "train" / "runs").iterdir())
    assert all(f"{k}={v}" in run_dir.name for k, v in params.items())  # named from its overrides
    assert (run_dir / "wandb_id.txt").read_text() == "agentrun0001"
    assert list((run_dir / "wandb").glob("offline-run-*-agentrun0001")), list((run_dir / "wandb").iterdir())


def test_groups_for_sweeps_and_multiruns(tmp_path, monkeypatch):
    monkeypatch.delenv("ETHOS_GROUP", raising=False)
    monkeypatch.setenv("ETHOS_SWEPT", "")  # set, so that the test's end restores its absence
    name_multirun(["-m", "model=mha,mla", "seed=1,2", "hydra/launcher=slurm", "hydra.launcher.partition=x"])
    assert os.environ["ETHOS_GROUP"] == "model=mha,mla,seed=1,2"
    assert os.environ["ETHOS_SWEPT"] == "model,seed"  # what tells the runs apart, for their dir names
    cfg = compose(["logger=wandb"], output_dir=tmp_path)
    assert cfg.logger.wandb.group == "model=mha,mla,seed=1,2"
    monkeypatch.delenv("ETHOS_GROUP")
    name_multirun(["model=mha"])  # a single run: no group of its own, the task's
    assert "ETHOS_GROUP" not in os.environ
    cfg = compose(["logger=wandb"], output_dir=tmp_path)
    assert cfg.logger.wandb.group == cfg.task_name
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    logger = instantiate(cfg.logger.wandb)
    assert logger._wandb_init["group"] == "sweep-abc" and logger._wandb_init["id"] == "run42"
    assert (tmp_path / "wandb_id.txt").read_text() == "run42"


@pytest.mark.parametrize("saved", [None, "old0001"])
def test_run_id_is_kept_in_the_run_dir(tmp_path, monkeypatch, saved):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    if saved:
        (tmp_path / "wandb_id.txt").write_text(saved)
    first = wandb_logger(str(tmp_path))._wandb_init["id"]
    assert first == (saved or (tmp_path / "wandb_id.txt").read_text())
    assert wandb_logger(str(tmp_path))._wandb_init["id"] == first  # a resume continues the same run
