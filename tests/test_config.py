"""Every config option composes and builds; bad configs fail with one clear line."""

from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, run_cli
from ethos.cli import build_model_config, find_resume_ckpt
from ethos.config import check_keys, instantiate, run_dir_name
from ethos.errors import ConfigError

GROUPS = ["model", "model/attn", "model/ffn", "data", "optim", "trainer", "logger", "callbacks", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose([f"{group}={option}"], output_dir=tmp_path)
    model_cfg = build_model_config(cfg)  # instantiates and dry-builds the backbone on meta
    assert model_cfg.d_model == cfg.model.d_model
    for g in ("optim", "data", "trainer", "logger", "callbacks"):
        if cfg.get(g):
            check_keys(cfg[g], g)
    instantiate(cfg.optim)
    data = instantiate(cfg.data)
    assert data.batch_size == cfg.data.batch_size
    for name, cb in (cfg.get("callbacks") or {}).items():
        assert instantiate(cb) is not None, name


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g


@pytest.mark.parametrize("override,key", [
    ("model.n_heads=7", "model.n_heads=7"),
    ("model.rope_dims=33", "model.rope_dims=33"),
    ("model.rope_dims=48", "model.rope_dims=48"),
    ("model.num_dense_layers=9", "model.num_dense_layers=9"),
    ("+model.ffn.expansion=4", "model.ffn.expansion"),
    ("+model.bogus=1", "model.bogus"),
    ("optim.schedule=step", "optim.schedule='step'"),
    ("objective=nsp", "objective='nsp'"),
])
def test_bad_config_raises_clear_error(override, key, tmp_path):
    cfg = compose([override], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        build_model_config(cfg)
        instantiate(cfg.optim)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_n_heads_message_lists_valid_values(tmp_path):
    with pytest.raises(ConfigError, match=r"must divide model.d_model=256 \(valid: 1, 2, 4, 8, 16"):
        build_model_config(compose(["model.n_heads=7"], output_dir=tmp_path))


def test_missing_checkpoint_path(tmp_path):
    cfg = compose([f"ckpt_path={tmp_path / 'nope.ckpt'}"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=.*no such checkpoint file"):
        find_resume_ckpt(cfg, tmp_path)


@pytest.mark.parametrize("override,expect", [
    ("model.n_heads=7", "model.n_heads=7: must divide model.d_model=256"),
    ("model.rope_dims=33", "model.rope_dims=33: must be even and between 0 and the head dim 32"),
])
def test_cli_prints_one_line_and_exits(override, expect, tmp_path):
    res = run_cli([override, "logger=csv"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (Path(tmp_path) / ".cache").exists()  # failed before any data was prepared


def test_run_dir_is_stable_and_safe():
    assert run_dir_name(None, "") == "default"
    assert run_dir_name(None, "model=mla,seed=1") == "model=mla,seed=1"
    assert run_dir_name("mine", "model=mla") == "mine"
    assert "/" not in run_dir_name(None, "data.path=/a/b")
    long = run_dir_name(None, "x" * 500)
    assert len(long) <= 120 and long == run_dir_name(None, "x" * 500)


def test_precision_follows_device(tmp_path):
    cfg = compose([], output_dir=tmp_path)
    assert cfg.trainer.precision == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
