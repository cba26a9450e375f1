"""Run-dir names (ethos.rundir.run_dir_name): stable, safe, within MAX_NAME, and when a multirun's names must
be shortened, what tells its runs apart (the swept overrides) stays whole."""

import pytest
from hydra import compose, initialize_config_dir

from ethos.config import CONF_DIR, register_resolvers
from ethos.rundir import MAX_NAME, override_items, run_dir_name, swept_keys

EXPERIMENTS = ["subspace_encoder_mha", "subspace_encoder_mla", "subspace_encoder_mla_o"]
DATA = ["data.batch_size=32", "data.eval_batch_size=32", "data.path=/scratch/datasets/wikitext-103",
        "data.tokenizer=/scratch/models/bert-base-uncased"]


def override_dirname(lines: list[str]) -> str:
    return ",".join(sorted(lines))  # what Hydra makes of a job's overrides (kv_sep "=", item_sep ",")


def test_a_multirun_keeps_its_swept_overrides_whole():
    """python train.py -m experiment=subspace_encoder_mha,subspace_encoder_mla,subspace_encoder_mla_o <DATA>:
    the overrides its runs share do not fit beside the experiment; the experiment stays."""
    swept = ",".join(swept_keys(["-m", f"experiment={','.join(EXPERIMENTS)}", *DATA]))
    assert swept == "experiment"
    dirnames = [override_dirname([f"experiment={e}", *DATA]) for e in EXPERIMENTS]
    assert all(len(d) > MAX_NAME for d in dirnames)
    names = [run_dir_name(None, d, swept) for d in dirnames]
    assert len(set(names)) == 3
    for name, experiment in zip(names, EXPERIMENTS):
        assert f"experiment={experiment}," in name or f"experiment={experiment}-" in name, name
        assert len(name) <= MAX_NAME and name == run_dir_name(None, override_dirname([f"experiment={experiment}",
                                                                                       *DATA]), swept)
    # without what it sweeps (a single run) a long name keeps its head, as before
    head = run_dir_name(None, dirnames[0])
    assert head.startswith(dirnames[0][:100].replace("/", "_")) and len(head) <= MAX_NAME


def test_the_run_dir_of_a_composed_job_follows_ETHOS_SWEPT(monkeypatch):
    """The same, through ethos/conf/hydra/default.yaml: the sweep subdir reads the swept keys from ETHOS_SWEPT."""
    register_resolvers()
    monkeypatch.setenv("ETHOS_SWEPT", "experiment")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=subspace_encoder_mla_o", *DATA], return_hydra_config=True)
    subdir = cfg.hydra.sweep.subdir
    assert "experiment=subspace_encoder_mla_o" in subdir and len(subdir) <= MAX_NAME
    monkeypatch.delenv("ETHOS_SWEPT")
    assert "experiment=" not in cfg.hydra.sweep.subdir  # a single run's name: the head of its overrides


def test_shortened_names_are_stable_distinct_and_bounded():
    shared = ",".join(f"model.option_{i}=value_{i}" for i in range(12))  # a long prefix all runs share
    names = {}
    for seed in range(20):
        for lr in ("1e-3", "1e-4"):
            dirname = f"{shared},optim.lr={lr},seed={seed}"
            name = run_dir_name(None, dirname, "optim.lr,seed")
            assert name == run_dir_name(None, dirname, "optim.lr,seed")  # same command, same dir
            assert len(name) <= MAX_NAME and f"optim.lr={lr}" in name and f"seed={seed}" in name
            names[dirname] = name
    assert len(set(names.values())) == len(names)
    # with no swept keys known, the shared head is cut and only the hash tells them apart: still distinct
    heads = {run_dir_name(None, d) for d in names}
    assert len(heads) == len(names) and all(len(h) <= MAX_NAME for h in heads)
    # swept values too long to fit: their head, still distinct and bounded
    long = [run_dir_name(None, f"a=1,data.path=/x/{'y' * 150}{i}", "data.path") for i in range(3)]
    assert len(set(long)) == 3 and all(len(n) <= MAX_NAME for n in long)


@pytest.mark.parametrize("dirname", ["a=1,b=[x,y],c='p,q',d=m\\,n,e={k:v,w:z},f=g(1,2)", "a=1"])
def test_override_items_keep_commas_inside_their_values(dirname):
    items = override_items(dirname)
    assert ",".join(items) == dirname and all("=" in i for i in items)
    if len(items) > 1:
        assert items == ["a=1", "b=[x,y]", "c='p,q'", "d=m\\,n", "e={k:v,w:z}", "f=g(1,2)"]


def test_names_are_filesystem_safe():
    name = run_dir_name(None, "data.path=/a/b c,experiment=x" + ",z=" + "q" * 200, "experiment")
    assert "/" not in name and " " not in name and "experiment=x" in name and len(name) <= MAX_NAME


def test_swept_keys_are_hydras_sweeps_of_the_runs():
    args = ["-m", "experiment=a,b", "seed=1,2", "data.x=3", "hydra/launcher=slurm", "hydra.launcher.partition=p,q",
            "+model.extra=range(3)", "optim.betas=[0.9,0.95]", "finetune_after.overrides=[\"a=1\",\"b=2\"]",
            "model=glob(m*)", "--config-name", "train", "~callbacks.x"]
    assert swept_keys(args) == ["experiment", "model", "model.extra", "seed"]
    assert swept_keys(["model=mha"]) == []
