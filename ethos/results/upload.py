"""The results tables logged to W&B, as a run of their own beside the multirun's runs (its group)."""

import os
from pathlib import Path


def log_to_wandb(df, groups, root: Path, group: str | None) -> None:
    import wandb  # heavy, and needed only when the runs used W&B

    from ethos.loggers import has_wandb_key  # imports Lightning: likewise

    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
    where = root / ".results"  # hidden: the sweep dir lists run dirs only
    where.mkdir(exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ethos"), group=group, name="results",
                     job_type="results", dir=str(where), mode=mode, reinit="finish_previous")
    run.log({"results/runs": wandb.Table(dataframe=df.astype(str)),
             "results/groups": wandb.Table(dataframe=groups.astype(str))})
    run.finish()
