"""Every config option composes and builds; bad configs fail with one clear line."""

import contextlib
from pathlib import Path

import pytest
import torch

from conftest import compose, run_cli
from ethos.checks import build_model_config, check
from ethos.config import CONF_DIR, instantiate
from ethos.errors import ConfigError
from ethos.rundir import find_resume_ckpt, run_dir_name

GROUPS = ["model", "model/attn", "model/ffn", "data", "task", "optim", "trainer", "logger", "callbacks", "experiment",
          "debug"]
NEEDS = {  # what an option cannot run without: its data, or keys that have no sensible default
    "data=text_labels": ["data.data_files.train=a.csv", "data.data_files.validation=b.csv", "data.num_classes=2"],
    "task=finetune": ["data=docstrings"], "task=classify": ["data=shapes"], "task=probe": ["data=shapes"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose([f"{group}={option}", *NEEDS.get(f"{group}={option}", [])], output_dir=tmp_path)
    model_cfg, _ = check(cfg)  # types and keys of every group, then a dry build of the backbone on meta
    assert model_cfg.d_model == cfg.model.d_model
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
    ("+task._target_=ethos.tasks.nsp.NextSentence",
     "task._target_='ethos.tasks.nsp.NextSentence': cannot be imported (ModuleNotFoundError: No module named "
     "'ethos.tasks.nsp')"),
    ("+task._target_=ethos.tasks.mlm.LanguageModel", "task._target_=ethos.tasks.mlm.LanguageModel: not a task"),
])
def test_bad_config_raises_clear_error(override, key, tmp_path):
    cfg = compose([override], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        check(cfg)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_n_heads_message_lists_valid_values(tmp_path):
    with pytest.raises(ConfigError, match=r"must divide model.d_model=256 \(valid: 1, 2, 4, 8, 16"):
        build_model_config(compose(["model.n_heads=7"], output_dir=tmp_path))


def test_missing_checkpoint_path(tmp_path):
    cfg = compose([f"ckpt_path={tmp_path / 'nope.ckpt'}"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=.*no such checkpoint file"):
        find_resume_ckpt(cfg.ckpt_path, cfg.resume, tmp_path)


# (overrides, the start of the one line printed): wrong types and out-of-range values in every group
BAD_VALUES = [
    (["model.n_heads=7"], "model.n_heads=7: must divide model.d_model=256"),
    (["model.rope_dims=33"], "model.rope_dims=33: must be even"),
    (["model.d_model=abc"], "model.d_model='abc': must be an integer > 0"),
    (["model.n_layers=0"], "model.n_layers=0: must be an integer > 0"),
    (["model.dropout=1.0"], "model.dropout=1.0: must be a number >= 0 and < 1"),
    (["model.norm=batchnorm"], "model.norm='batchnorm': must be one of 'rmsnorm', 'layernorm'"),
    (["model.learned_pos=maybe"], "model.learned_pos='maybe': must be true or false"),
    (["model=mla", "model.attn.kv_latent=-4"], "model.attn.kv_latent=-4: must be"),
    (["model=peer", "model.ffn.num_experts=1000"], "model.ffn.num_experts=1000: must be a perfect square"),
    (["model.learned_pos=true", "model.max_seq_len=64"], "data.seq_len=128: longer than model.max_seq_len=64"),
    (["data.seq_len=-3"], "data.seq_len=-3: must be an integer >= 8"),
    (["data.batch_size=abc"], "data.batch_size='abc': must be an integer > 0"),
    (["data.mlm_probability=1.5"], "data.mlm_probability=1.5: must be a number > 0 and < 1"),
    (["data.packing=zip"], "data.packing='zip': must be one of 'pack', 'truncate'"),
    (["data=shapes", "task=classify", "task.pool=max"], "task.pool='max': must be one of 'cls', 'avg'"),
    (["data=shapes", "task=probe", "task.patch_size=5"], "task.patch_size=5: must divide data.img_size=32"),
    (["data=text_labels", "+data.data_files.test=x.csv"], "data.data_files.test: unknown key (valid: train, valid"),
    (["data=shapes", "data.scale=[0.5]"], "data.scale=[0.5]: must be a list of 2, each a number >= 0 and <= 1"),
    (["optim.lr=abc"], "optim.lr='abc': must be a number > 0"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: must be a list of 2, each a number > 0 and < 1"),
    (["optim.schedule=step"], "optim.schedule='step': must be one of 'linear', 'cosine', 'constant'"),
    (["optim.min_lr_ratio=1.0"], "optim.min_lr_ratio=1.0: must be a number >= 0 and < 1"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc': must be an integer > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be an integer > 0"),
    (["trainer.precision=bf17"], "trainer.precision='bf17': must be one of 64, 32, 16"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1: must be a number >= 0 or null"),
    (["callbacks.checkpoint.every_n_train_steps=x"], "callbacks.checkpoint.every_n_train_steps='x': must be"),
    (["seed=abc"], "seed='abc': must be an integer >= 0"),
    (["resume=maybe"], "resume='maybe': must be one of 'auto', 'never'"),
    (["+model.bogus=1"], "model.bogus: unknown key for ethos.models.config.ModelConfig"),
    (["trainer=gpu", "optim.fused=true"], "optim.fused=true: Lightning cannot clip the gradients of a fused"),
]


@pytest.fixture(scope="module")
def warm_signatures(cache_dir, tmp_path_factory):
    """What a user has after their first run: the signatures the config check reads, cached."""
    out = tmp_path_factory.mktemp("warm")
    for overrides, _ in BAD_VALUES:
        with contextlib.suppress(ConfigError):
            check(compose(overrides, output_dir=out))
    assert (cache_dir / "signatures.pkl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("overrides,expect", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_cli_prints_one_line_and_exits(overrides, expect, tmp_path, warm_signatures):
    res = run_cli([*overrides, "logger=csv"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"ethos: config error: {expect}"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (Path(tmp_path) / ".cache").exists()  # failed before any data was prepared


def test_bad_values_cover_every_group():
    groups = {o[0].split("=")[0].lstrip("+").split(".")[0] for o, _ in BAD_VALUES}
    assert {"model", "data", "optim", "trainer", "callbacks"} <= groups and len(BAD_VALUES) >= 20
    assert sum("'" in e.split(":")[0] for _, e in BAD_VALUES) >= 8  # wrong types, not only ranges


def test_run_dir_is_stable_and_safe():
    assert run_dir_name(None, "") == "default"
    assert run_dir_name(None, "model=mla,seed=1") == "model=mla,seed=1"
    assert run_dir_name("mine", "model=mla") == "mine"
    assert "/" not in run_dir_name(None, "data.path=/a/b")
    long = run_dir_name(None, "x" * 500)
    assert len(long) <= 120 and long == run_dir_name(None, "x" * 500)
    dirname = f"data.path={'x' * 200},seed=1"
    swept = run_dir_name(None, dirname, "seed")  # a multirun's: what it sweeps stays whole
    assert len(swept) <= 120 and "seed=1" in swept and swept == run_dir_name(None, dirname, "seed")


def test_precision_follows_device(tmp_path):
    cfg = compose([], output_dir=tmp_path)
    assert cfg.trainer.precision == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
