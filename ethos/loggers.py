"""Logger factories used from ethos/conf/logger/*.yaml."""

import csv
import logging
import netrc
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str = "ethos", name: str | None = None, **kwargs) -> WandbLogger:
    """W&B logger that is offline without an API key and continues the run dir's W&B run on resume.

    The run id is stored in <run dir>/wandb_id.txt: re-running the same command (resume=auto, a
    SLURM requeue) logs into the same W&B run instead of starting a new one.
    """
    mode = os.environ.get("WANDB_MODE", "")
    offline = mode in ("offline", "dryrun") or (mode != "disabled" and not has_wandb_key())
    run_id = run_id_for(Path(save_dir))
    if os.environ.get("WANDB_SWEEP_ID"):  # a sweep agent's run: its runs share the sweep's group
        kwargs["group"] = f"sweep-{os.environ['WANDB_SWEEP_ID']}"
    return ResilientWandbLogger(save_dir=save_dir, project=project, name=name or Path(save_dir).name, id=run_id,
                                resume="allow", offline=offline, **kwargs)


class ResilientWandbLogger(WandbLogger):
    """W&B logging that cannot take the run down: when its service process is gone (SLURM's SIGTERM on a
    requeue reaches every process of the job, W&B's too), warn once and log nothing more to W&B, so the
    checkpoint is still saved; the resumed run continues the same W&B run."""

    _lost = False

    def _guard(self, fn, *args, **kwargs):
        if self._lost:
            return None
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, BrokenPipeError) as e:
            self._lost = True
            log.warning(f"W&B stopped answering ({e!r}): no more W&B logging in this process")
            return None

    def log_metrics(self, metrics, step=None):
        return self._guard(super().log_metrics, metrics, step)

    def log_hyperparams(self, params):
        return self._guard(super().log_hyperparams, params)

    def finalize(self, status):
        return self._guard(super().finalize, status)


def run_id_for(run_dir: Path) -> str:
    """The run dir's W&B run id, kept in wandb_id.txt. Under a sweep agent the agent chose the id (it
    sets WANDB_RUN_ID and waits for that run): it wins and is recorded, so a resume keeps it."""
    id_file = run_dir / "wandb_id.txt"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = os.environ.get("WANDB_RUN_ID") or (id_file.read_text().strip() if id_file.exists() else "")
    run_id = run_id or uuid.uuid4().hex[:12]
    if rank_zero_only.rank != 0:
        # only rank 0 logs to W&B; srun starts all ranks at once, and a second writer could replace the id
        # rank 0 runs under
        return run_id
    if not id_file.exists() or id_file.read_text().strip() != run_id:
        id_file.write_text(run_id)
    return run_id


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; we continue it, starting from its header
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger, but a resumed run appends to metrics.csv instead of deleting it.

    Rows from steps the resumed run will redo (logged after the checkpoint it resumes from) are
    dropped first, so every step appears exactly once.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only  # the file is rank 0's; other ranks' `experiment` is a dummy
    def drop_after(self, step: int) -> None:
        path = Path(self.experiment.metrics_file_path)
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if r[col] == "" or int(float(r[col])) < step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)
