"""The package installs anywhere: a wheel built from this checkout, installed outside it, trains from another
directory with the configs it carries, and a user's own config directory joins through Hydra's search path."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
from ethos.config import CONF_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps --target` of the wheel: the package and its console script, nothing of the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    wheels, target, source = tmp / "wheels", tmp / "site", tmp / "source"
    # what a build reads, copied: setuptools builds in the source tree (build/), whose stale files would otherwise
    # end up in the wheel, and whose leftovers would end up in the checkout
    shutil.copytree(ROOT / "ethos", source / "ethos", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = wheels.glob("ethos-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    return wheel, target


def run_installed(target, args, cwd, timeout=600):
    """`ethos-train ARGS` as installed, run from `cwd`: the installed package comes first on the path, so the
    checkout's (editable) copy is never imported."""
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    script = target / "bin" / "ethos-train"
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_every_config(installed):
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    ours = {f"ethos/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert len(ours) > 50 and ours <= names
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
    assert (target / "bin" / "ethos-train").is_file()


def test_the_installed_entry_point_trains_from_another_directory(installed, tmp_path, cache_dir):
    _, target = installed
    work = tmp_path / "my_project"
    work.mkdir()
    r = run_installed(target, ["--cfg", "job"], work)
    assert r.returncode == 0 and "task_name: train" in r.stdout, r.stderr[-3000:]
    where = subprocess.run([sys.executable, "-c", "import ethos.config; print(ethos.config.CONF_DIR)"], cwd=work,
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(target)), where  # the installed copy, not the checkout
    r = run_installed(target, ["debug=tiny", "logger=csv", "print_config=false", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "run_name=two_steps"], work)
    assert r.returncode == 0, r.stderr[-3000:]
    run = work / "outputs" / "train" / "runs" / "two_steps"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert '"status": "done"' in (run / "status.json").read_text()


def test_a_users_config_dir_joins_through_the_search_path(installed, tmp_path):
    _, target = installed
    mine = tmp_path / "my_conf"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "wide_mha.yaml").write_text("defaults:\n  - mha\n  - _self_\nd_model: 384\nn_heads: 6\n")
    r = run_installed(target, [f"hydra.searchpath=[file://{mine}]", "model=wide_mha", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "d_model: 384" in r.stdout and "n_heads: 6" in r.stdout
