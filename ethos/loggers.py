"""Logger factories used from conf/logger/*.yaml."""

import csv
import netrc
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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
    id_file = Path(save_dir) / "wandb_id.txt"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
    return WandbLogger(save_dir=save_dir, project=project, name=name or Path(save_dir).name, id=run_id,
                       resume="allow", offline=offline, **kwargs)


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
