"""One table per study: `python -m ethos.results DIR [--group NAME]`, also written at the end of every multirun.

Every run dir under DIR (one with a config_resolved.yaml) becomes a row: its overrides, variant, parameter
counts, best and final validation loss and bits per byte (val/bpb), downstream accuracy when a fine-tune names
it as its pretrained run, tokens/s and status. Rows that differ only in `seed` form a group, reported as mean ±
std over its finished runs; a group is named by the overrides that differ between groups, and what every run
shares is said once.
Written beside the runs as results.csv (per run), results_groups.csv, results.md (both tables) and
val_curves.png (validation loss of every run, one colour per group); logged to W&B as tables when the runs
used W&B. A run that failed, was interrupted or cannot be read is a marked row, never an error.

    table.py     the rows, their groups, results.md      groups.py    what tells the groups apart
    plots.py     val_curves.png                         upload.py    the W&B tables
    __main__.py  the command line                       here         write_results and the Hydra callback
"""

import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ethos.results.plots import plot_curves
from ethos.results.table import gather, markdown, summarize
from ethos.rundir import read_status_record

__all__ = ["WriteResults", "gather", "summarize", "sweep_dirs", "write_results"]


def write_results(root: Path, group: str | None = None, use_wandb: bool | None = None):
    """Write the tables and plot into root; returns (per-run, per-group) DataFrames."""
    root = Path(root)
    df = gather(root, group)
    groups = summarize(df)
    df.to_csv(root / "results.csv", index=False)
    groups.to_csv(root / "results_groups.csv", index=False)
    (root / "results.md").write_text(markdown(df, groups))
    plot_curves(df, root, root / "val_curves.png")
    if use_wandb is None:  # as the runs did: any of them logged to W&B
        use_wandb = any("wandb" in (OmegaConf.load(root / r / "config_resolved.yaml").get("logger") or {})
                        for r in df["run"] if (root / r / "config_resolved.yaml").exists())
    if use_wandb and os.environ.get("WANDB_MODE") != "disabled":
        from ethos.results.upload import log_to_wandb  # imports wandb: only when the runs used it

        log_to_wandb(df, groups, root, group)
    return df, groups


class WriteResults(Callback):
    """Hydra callback (ethos/conf/hydra/default.yaml): the table of a multirun's own runs when it ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        group = os.environ.get("ETHOS_GROUP")
        log = logging.getLogger(__name__)
        try:
            for sweep in sweep_dirs(config, group):
                write_results(sweep, group=group)
                log.info(f"results: {sweep / 'results.md'}")
        except Exception:  # the runs are done and saved; a table that fails must not fail the multirun
            log.exception("results table not written")


def sweep_dirs(config, group: str | None) -> list[Path]:
    """Where this multirun's runs are. The sweep dir is per job (outputs/<task_name>/multiruns): a swept
    experiment sets its own task_name, so the runs may not be where the multirun's own config says. Found by
    their status.json (its group), else the configured dir."""
    own = Path(config.hydra.sweep.dir)
    found = set()
    for pattern, root in (("*/status.json", own), ("*/multiruns/*/status.json", Path(config.paths.log_dir))):
        for status in root.glob(pattern) if root.is_dir() else []:
            # a job writing it right now, or a broken one, reads as None: its dir is found by the others
            if (read_status_record(status.parent) or {}).get("group") == group:
                found.add(status.parent.parent)
    return sorted(found) or [own]
