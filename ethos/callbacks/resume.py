"""Nothing lost: Ctrl-C or SIGTERM finishes the current step, saves last.ckpt and stops; so does the end of fit."""

import logging
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class GracefulStop(L.Callback):
    """First SIGINT/SIGTERM: stop after the running step with a checkpoint; a second one aborts.

    Lightning's own SIGTERM handling (SLURM requeue) keeps working: its handler runs as well.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning(f"signal {signum}: saving a checkpoint after this step (again to abort)")
        old = self._old.get(signum)
        if signum == signal.SIGTERM and callable(old):
            old(signum, frame)

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path:  # a resumed run redoes the steps logged after its checkpoint
            for logger in trainer.loggers:
                if hasattr(logger, "drop_after"):
                    logger.drop_after(trainer.global_step)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): keep the defaults
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.requested and not trainer.should_stop:
            trainer.save_checkpoint(self.path)  # Lightning writes to a temp file and renames
            log.warning(f"saved {self.path} at step {trainer.global_step}; re-run the same command to resume")
            trainer.should_stop = True
            pl_module.interrupted = True

    def on_train_end(self, trainer, pl_module):
        # the run may end between ModelCheckpoint's saves: keep last.ckpt at the final step
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if saved != trainer.global_step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()
