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
from omegaconf import OmegaConf
from slurm_cluster import slurm_unavailable, wait_gone
from test_train import metrics

from conftest import ROOT, assert_same_training_state

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


@pytest.mark.slow
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
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    res = train_py([*common, "trainer.max_steps=15"], tmp_path, cache_dir)  # the same command continues
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout + res.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 15
    steps = [s for s, _ in metrics(run_dir)["train/loss"]]
    assert steps == sorted(set(steps)) and len(steps) == 15, steps  # every step once


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_training_resumes_with_the_same_log(cache_dir, tmp_path):
    """A stop mid-training must not change what the resumed run logs: every step once, validation at the
    same steps as an uninterrupted run (Lightning's extra validation on stop would shift both)."""
    common = [*TINY, *EXACT, "trainer.val_check_interval=5", "validate_first=false", f"paths.log_dir={tmp_path}"]
    res = train_py([*common, "run_name=stopped", "trainer.max_steps=20",
                    "+callbacks.kill._target_=slurm_cluster.SignalAt", "+callbacks.kill.step=7",
                    "+callbacks.kill.training=true"], tmp_path, cache_dir)
    assert res.returncode == 143, res.stderr[-3000:]
    run_dir = tmp_path / "train" / "runs" / "stopped"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    for name in ("stopped", "straight"):
        res = train_py([*common, f"run_name={name}", "trainer.max_steps=20"], tmp_path, cache_dir)
        assert res.returncode == 0, res.stderr[-3000:]
    got, want = metrics(run_dir), metrics(tmp_path / "train" / "runs" / "straight")
    for key in ("train/loss", "val/loss"):
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_multirun_2x2_on_slurm(slurm, cache_dir, tmp_path):
    res = train_py(["-m", *CPU_LAUNCHER, "hydra.launcher.timeout_min=5", "debug=tiny", "logger=[csv,wandb]",
                    "print_config=false", "trainer.max_steps=5",
                    "model.n_heads=2,4", "seed=1,2", f"paths.log_dir={tmp_path}"], tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "train" / "multiruns").iterdir() if not p.name.startswith("."))
    assert [p.name for p in runs if p.is_dir()] == [
        f"debug=tiny,model.n_heads={h},seed={s},trainer.max_steps=5" for h in (2, 4) for s in (1, 2)]
    groups = set()
    for run in filter(Path.is_dir, runs):
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
        cfg = OmegaConf.load(run / "config_resolved.yaml")
        groups.add(cfg.logger.wandb.group)
        assert (run / "wandb").is_dir() and (run / "wandb_id.txt").is_file()  # an (offline) W&B run each
    # one W&B group for the sweep, named after it: ETHOS_GROUP from the launcher reached every SLURM job
    [group] = groups
    assert "model.n_heads=2,4" in group and "seed=1,2" in group, group


class Multirun:
    """`train.py -m` with the SLURM launcher, in the background. SLURM holds a requeued job for 2 minutes
    (BeginTime) before it may start again; while waiting, the test releases ours at once (`scontrol update
    StartTime=now`): the requeue itself is SLURM's, only its waiting is cut. On exit, whatever is still queued
    is cancelled, so a failed test leaves no (requeued) job running into the next."""

    def __init__(self, args: list[str], tmp: Path, cache_dir: Path):
        self.tmp, self.sweep = tmp, tmp / "train" / "multiruns"
        self.cmd = [sys.executable, str(ROOT / "train.py"), "-m", *CPU_LAUNCHER, *args, f"paths.log_dir={tmp}"]
        self.env = env(cache_dir)

    def __enter__(self):
        self.log = open(self.tmp / "launcher.txt", "w")  # a file, not a pipe: a full pipe blocks the launcher
        self.proc = subprocess.Popen(self.cmd, cwd=self.tmp, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.log.close()
        for job in self.arrays():
            subprocess.run(["scancel", job], capture_output=True)

    def arrays(self) -> set[str]:
        """The array job ids (submitit's folders are .submitit/<job>_<task>)."""
        return {p.name.split("_")[0] for p in (self.sweep / ".submitit").glob("[0-9]*")}

    def output(self) -> str:
        return (self.tmp / "launcher.txt").read_text()[-3000:] + "\n" + job_logs(self.sweep)[-3000:]

    def release_requeued(self) -> None:
        for job in self.arrays():
            out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True, text=True).stdout
            for task, state, reason in (line.split() for line in out.splitlines()):
                if state == "PENDING" and reason == "BeginTime":
                    subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"], capture_output=True)

    def wait(self, timeout: float, until=None) -> int | None:
        """Until `until()` holds (then None), or the launcher exits (its status)."""
        deadline = time.time() + timeout
        while until is None or not until():
            if self.proc.poll() is not None:
                assert until is None, f"the multirun ended first:\n{self.output()}"
                return self.proc.returncode
            assert time.time() < deadline, f"not done after {timeout} s:\n{self.output()}"
            self.release_requeued()
            time.sleep(1)
        return None


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return metrics(run_dir).get("train/loss", []) if (run_dir / "csv" / "metrics.csv").exists() else []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_scontrol_requeue_resumes_exactly(slurm, cache_dir, tmp_path):
    """Two identical jobs of one array (they differ in save_top_k only): task 0 is requeued mid-run, task 1 runs
    straight through, side by side on the same node, so both see the same threads and libraries. The
    requeued one resumes at its saved step, in its W&B run, and logs the same losses step for step."""
    steps = 60
    args = ["hydra.launcher.timeout_min=10", "logger=[csv,wandb]", "debug=tiny", "print_config=false", *EXACT,
            f"trainer.max_steps={steps}", "trainer.val_check_interval=10", "seed=3",
            "callbacks.checkpoint.save_top_k=1,2"]
    with Multirun(args, tmp_path, cache_dir) as run:
        def run_dir(k: int) -> Path:  # long names end in a hash: find it by its leading override
            found = list(run.sweep.glob(f"callbacks.checkpoint.save_top_k={k},*"))
            return found[0] if found else run.sweep / "not yet"

        run.wait(240, until=lambda: len(losses(run_dir(1))) >= 15)
        requeued, straight = run_dir(1), run_dir(2)
        run_id = (requeued / "wandb_id.txt").read_text()
        [array] = run.arrays()
        subprocess.run(["scontrol", "requeue", f"{array}_0"], check=True)
        assert run.wait(300) == 0, run.output()
    log = (requeued / "train.log").read_text()
    assert "resuming from" in log, log[-3000:]
    assert (requeued / "wandb_id.txt").read_text() == run_id  # the same W&B run continues
    assert torch.load(requeued / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    got, want = losses(requeued), losses(straight)
    assert [s for s, _ in got] == [s for s, _ in want] and len(got) == len({s for s, _ in got}), (got, want)
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_limit_signal_requeues_and_finishes(slurm, cache_dir, tmp_path):
    """--time=2 with SIGUSR2 60 s before: GracefulStop saves, submitit requeues, the job resumes and finishes.
    SLURM checks time limits periodically, so the signal comes up to ~30 s early (even before the run installs
    its handler: then submitit requeues without a save, and nothing was trained to lose); max_num_timeout is
    raised so that such early signals cannot exhaust the requeues."""
    steps = 400  # >= 60 s of training (slurm_cluster.Slow) on any machine: more than one attempt gets
    args = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60", "hydra.launcher.max_num_timeout=10",
            *TINY, *EXACT, f"trainer.max_steps={steps}", "trainer.val_check_interval=100", "validate_first=false",
            "+callbacks.slow._target_=slurm_cluster.Slow", "+callbacks.slow.seconds=0.15"]
    with Multirun(args, tmp_path, cache_dir) as run:
        assert run.wait(560) == 0, run.output()
        out = job_logs(run.sweep)
    assert "Caught signal SIGUSR2" in out and "resuming from" in out, out[-3000:]
    [run_dir] = [p for p in run.sweep.iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    steps_logged = [s for s, _ in losses(run_dir)]
    assert steps_logged == sorted(set(steps_logged)), "a step logged twice: the resume did not drop the redone steps"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_over_slurm_tasks(slurm, cache_dir, tmp_path):
    """Multi-node's code path on one node: 2 SLURM tasks (srun, hydra.launcher.tasks_per_node=2) are the 2 DDP
    ranks through Lightning's SLURM environment (ranks from SLURM_PROCID, both started at once, no launcher of
    Lightning's own); they train as one process with the global batch. With nodes=N the same environment
    spreads the ranks over N nodes."""
    from test_ddp import COMMON, STEPS, ckpt, one_process

    args = [*COMMON, "task=mlm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "data.batch_size=8", f"trainer.max_steps={STEPS}", "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=5"]
    with Multirun(args, tmp_path, cache_dir) as run:
        assert run.wait(240) == 0, run.output()
        [run_dir] = [p for p in run.sweep.iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert "trainer/effective_batch_size: 16" in (run_dir / "csv" / "hparams.yaml").read_text()
    assert_same_training_state(ckpt(one_process(tmp_path / "one", "mlm")), ckpt(run_dir), rtol=1e-4, atol=1e-6,
                               opt_atol=1e-8)


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
