"""`python train.py` / `ethos-train`: the Hydra entry point and its exit codes.

0 only when training finished; 2 for a config mistake (one line naming the key, reported before any data is read
or any large module is imported); 128 + the signal for a run stopped by one (130 for Ctrl-C), so a scheduler never
records an interrupted job as a success. In a multirun a failed job is marked in its run dir and the sweep goes on.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ethos.config import CONF_DIR, register_resolvers
from ethos.console import quiet_warnings
from ethos.errors import ConfigError
from ethos.rundir import read_status, run_dir_name, swept_keys, write_status
from ethos.study import train

log = logging.getLogger("ethos")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _main(cfg: DictConfig) -> float | None:


    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(cfg.paths.output_dir)

    def mark(status: str, **kw) -> None:
        if read_status(run_dir) != "done":  # a finished pretraining whose fine-tune (finetune_after) failed stays
            write_status(run_dir, status, **kw)  # done: the fine-tune's own dir says what failed

    try:
        return train(cfg)
    except ConfigError as e:
        if multirun:  # the sweep's table shows the job that never started
            mark("failed", error=str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"ethos: {e.kind}: {e}", file=sys.stderr)
        if multirun:
            return None  # one bad job of a sweep must not stop the others
        sys.exit(2)
    except Exception as e:  # not SystemExit: a job stopped by a signal exits non-zero so SLURM requeues it
        from ethos.callbacks.resume import RECEIVED, exit_status  # Lightning: already imported by a run that failed

        if RECEIVED["signum"]:  # whatever broke after a stop signal (the scheduler killing W&B's service,
            log.exception("stopped by a signal")  # submitit out of requeues): not a finished job
            mark("interrupted")
            sys.exit(exit_status(RECEIVED["signum"]))
        mark("failed", error=f"{type(e).__name__}: {e}")
        if multirun:
            log.exception("job failed; the sweep goes on")
            return None
        raise


def name_multirun(args: list[str]) -> None:
    """Hydra gives a multirun no name its jobs can read: name it after its overrides and pass that by
    the environment (SLURM jobs inherit it), so that all its runs share one W&B group. Its swept keys go the
    same way (ETHOS_SWEPT): a run dir name that must be shortened keeps them whole (ethos/rundir.py)."""
    if "-m" in args or "--multirun" in args:
        overrides = [a for a in args if "=" in a and not a.lstrip("+~").startswith("hydra")]
        os.environ.setdefault("ETHOS_GROUP", run_dir_name(None, ",".join(overrides)))
        os.environ["ETHOS_SWEPT"] = ",".join(swept_keys(args))
    else:  # a single run's dir name depends on its own command line only
        os.environ.pop("ETHOS_SWEPT", None)


def main() -> None:
    quiet_warnings()
    register_resolvers()
    name_multirun(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
