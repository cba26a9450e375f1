"""The run dir: its name, its layout and its status. One home for what the entry point, the study table, the
fine-tune chain and the analysis tools all need to know about a run dir, so that none of them imports another.

    <run dir>/config_resolved.yaml   the composed config (and Hydra's .hydra/)
             checkpoints/last.ckpt   resume point; best-step*.ckpt ranked by val/loss
             csv/metrics.csv         every logged number (the results table reads it)
             wandb/, wandb_id.txt    the W&B run, resumed by id
             status.json             running | done | interrupted | failed, and the multirun it belongs to
             tokenizer/              the run's tokenizer (text)
             previous/<time>/        what resume=never set aside
"""

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from ethos.errors import ConfigError
from ethos.files import atomic_write

log = logging.getLogger("ethos")

STATUS_FILE = "status.json"
RUN_STATE = ("checkpoints", "csv", "wandb", "wandb_id.txt", STATUS_FILE)  # what a fresh run must not continue
MAX_NAME = 120  # file-system limits leave room for this and the paths under it


def run_dir_name(run_name: str | None, override_dirname: str) -> str:
    """Stable run directory name: explicit run_name, else the overrides, else 'default'."""
    name = run_name or override_dirname or "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)
    if len(name) > MAX_NAME:  # file-system limits: keep a readable head and a hash of the whole
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def run_dir_of(pretrained: str | Path) -> Path:
    """The run dir a `pretrained=` value names: itself, or for <run dir>/checkpoints/x.ckpt its run dir. Nothing
    is read (the config resolver calls it; whether the checkpoint exists is `checkpoint_path`'s check)."""
    path = Path(pretrained).expanduser()
    return path.parent.parent if path.suffix == ".ckpt" else path


def checkpoint_path(pretrained: str | Path, key: str = "pretrained") -> Path:
    """A run dir -> its checkpoints/last.ckpt; a file -> itself."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"{key}={pretrained}: no checkpoint there (a run dir with checkpoints/last.ckpt, "
                          "or a .ckpt file)")
    return path


def write_status(run_dir: Path, status: str, step: int | None = None, error: str | None = None) -> None:
    """<run dir>/status.json: running, done, interrupted or failed, with the multirun it belongs to."""
    record = {"status": status, "step": step, "error": error, "group": os.environ.get("ETHOS_GROUP"),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATUS_FILE, json.dumps(record))


def read_status(run_dir: Path) -> str | None:
    return (read_status_record(run_dir) or {}).get("status")


def read_status_record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def find_resume_ckpt(ckpt_path: str | None, resume: str, out_dir: Path) -> str | None:
    """The checkpoint a run continues from: `ckpt_path` if given, else with resume=auto the run dir's last.ckpt."""
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return str(path)
    last = out_dir / "checkpoints" / "last.ckpt"
    if resume == "auto" and last.is_file():
        return str(last)
    return None


def set_aside_previous_run(out_dir: Path, rank: int = 0) -> None:
    """resume=never in a used run dir: a fresh run, with its own logs and W&B run. The previous run's
    checkpoints and logs are moved to <run dir>/previous/<time>/, not deleted."""
    found = [out_dir / name for name in RUN_STATE if (out_dir / name).exists()]
    if not found or rank != 0:  # one mover: srun starts every rank of the job at once
        return
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.rename(dest / path.name)
    log.warning(f"resume=never: the previous run's {', '.join(p.name for p in found)} moved to {dest}")
