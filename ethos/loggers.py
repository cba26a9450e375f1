"""Logger factories used from conf/logger/*.yaml."""

import netrc
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


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
