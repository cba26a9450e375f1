"""Helpers for tests/test_slurm.py: a real single-node SLURM (scripts/slurm_local.sh) and a callback that signals
its own process, so a test can stop a run at an exact point (during validation)."""

import os
import signal
import subprocess
import time
from functools import cache
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


@cache
def slurm_unavailable() -> str | None:
    """None when a local SLURM is up (started if needed), else the one-line reason why not. Tests never
    install it (minutes of apt): scripts/slurm_local.sh does, as root."""
    import shutil

    if not (shutil.which("slurmctld") and shutil.which("sbatch")):
        return "SLURM is not installed: run scripts/slurm_local.sh as root (installs and starts a one-node SLURM)"
    try:
        res = subprocess.run([str(ROOT / "scripts" / "slurm_local.sh")], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no local SLURM: {e}"
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["no local SLURM"])[-1]
    return None


def squeue(name: str) -> list[str]:
    """Ids of the queued or running jobs named `name` (array tasks as <job>_<task>)."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def wait_gone(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"job {job} still queued after {timeout} s"
        time.sleep(1)


class SignalAt(L.Callback):
    """Sends `signal` to this process at the first validation batch after `step`, or with `training=True` in the
    training step after optimizer step `step` (tests only)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", training: bool = False):
        self.step, self.signum, self.training, self.sent = step, getattr(signal, signal_name), training, False

    def _send(self, trainer) -> None:
        if not self.sent and trainer.state.fn == "fit" and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self.training:
            self._send(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.training:
            self._send(trainer)


class Slow(L.Callback):
    """Sleeps after every training step, so that a run outlasts a time limit whatever the machine's speed."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
