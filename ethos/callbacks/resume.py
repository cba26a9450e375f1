"""Nothing lost: Ctrl-C, SIGTERM or the SLURM time-limit signal saves last.ckpt and stops; so does the end of fit.

Who owns which signal (README "Scaling out"):
- SIGUSR2 is the time-limit/preemption signal (`--signal=USR2@...`, submitit's default). Under Hydra's submitit
  launcher submitit owns it: after we saved, its handler requeues the job (counting `max_num_timeout`) and
  exits. Without submitit (scripts/slurm_array.sh) the batch script requeues on our exit status 140.
- SIGTERM is SLURM killing the job (`scontrol requeue`, preemption, scancel, the time limit itself): we save
  and exit non-zero; SLURM itself decides whether the job comes back.
- Lightning's SLURM auto-requeue (SIGUSR1) is switched off (`slurm_plugins`): two owners of one job would
  requeue it twice, and Lightning's SIGTERM handling aborts a validation pass without saving, exit status 0.
"""

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR2")
RECEIVED = {"signum": 0}  # the stop signal this process got (ethos.cli exits with its status whatever follows)


def slurm_plugins() -> list:
    """Trainer plugins: inside a SLURM job step, Lightning's SLURM environment without its auto-requeue (the
    cluster environment Lightning would pick anyway, minus its SIGUSR1 handler); elsewhere none, so Lightning
    detects torchrun & co. as usual."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM, 140 SIGUSR2). Never 0: a job that
    stopped on a signal did not finish, and the scheduler must not record a success."""
    return 128 + int(signum)


class Stopped(SystemExit):
    """Leaves a validation pass after the checkpoint was saved (Lightning cannot end one early otherwise).
    A SystemExit, so Hydra's multirun does not record it as one failed job and carry on with exit status 0."""


class GracefulStop(L.Callback):
    """First stop signal: save last.ckpt after the running training step (or at once when it arrives during
    validation) and stop with a non-zero exit status; a second one aborts. Signals after the save (SLURM's
    kill on requeue) are ignored: the checkpoint is written, the process is on its way out."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt", signals: tuple[str, ...] = STOP_SIGNALS):
        self.path = Path(dirpath) / filename
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.signum = 0  # the signal that asked us to stop; 0: none yet
        self.saved = False
        self.last_saved_step = None  # the step of the latest checkpoint any callback wrote in this process
        self._old = {}

    def _handler(self, signum, frame):
        if self.saved:
            log.warning(f"signal {signum}: checkpoint already saved, exiting")
            return
        if self.signum:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = RECEIVED["signum"] = signum
        log.warning(f"signal {signum}: saving a checkpoint after this step (again to abort)")

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path:  # a resumed run redoes the steps logged after its checkpoint
            for logger in trainer.loggers:
                if hasattr(logger, "drop_after"):
                    logger.drop_after(trainer.global_step)
        # installed after Lightning's own handlers (registered when fit starts), so these replace them
        for sig in self.signals:
            try:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some launchers): keep the defaults
                pass

    def _stop_requested(self, trainer) -> bool:
        if trainer.world_size > 1:  # any rank's signal stops all, at the same step: the save is collective
            return trainer.strategy.reduce_boolean_decision(bool(self.signum), all=False)
        return bool(self.signum)

    def _save_and_stop(self, trainer, pl_module) -> None:
        self.signum = self.signum or signal.SIGTERM  # another rank's signal
        trainer.save_checkpoint(self.path)  # Lightning writes to a temp file and renames
        self.saved = True
        log.warning(f"saved {self.path} at step {trainer.global_step}; re-run the same command to resume")
        trainer.should_stop = True
        # Lightning validates once more when a run stops early (it assumes EarlyStopping), and ModelCheckpoint
        # would then overwrite this last.ckpt with one saved mid-loop, from which a resume counts one batch
        # short (a logged step repeated, validation one step early). It also costs time SLURM may not give.
        # No public hook skips that pass: this private flag is the one way, and it is optional (hasattr).
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_skip_next_val"):
            epoch_loop._skip_next_val = True
        pl_module.interrupted = exit_status(self.signum)
        # the signal's previous owner gets it now that the state is safe: submitit requeues (and exits) on
        # SIGUSR2. Lightning's SIGTERM handler is not called: it would only abort the run a second time.
        old = self._old.get(self.signum)
        if self.signum not in (signal.SIGINT, signal.SIGTERM) and callable(old):
            log.warning(f"handing signal {self.signum} on to {getattr(old, '__qualname__', old)}")
            old(self.signum, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.saved and self._stop_requested(trainer):
            self._save_and_stop(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # a validation pass can take longer than SLURM waits between SIGTERM and SIGKILL: save now, and
        # leave; the resumed run repeats this step's validation
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.saved:
            return
        if self._stop_requested(trainer):
            self._save_and_stop(trainer, pl_module)
            raise Stopped(pl_module.interrupted)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.last_saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        # the run may end between ModelCheckpoint's saves: keep last.ckpt at the final step
        if self.last_saved_step != trainer.global_step and not trainer.sanity_checking and not self.saved:
            trainer.save_checkpoint(self.path)
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self):
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()

