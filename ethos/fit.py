"""One run: where it starts from, then data, model, loggers, callbacks and trainer built from the checked config,
and `trainer.fit`. Returns the final val/loss (what a sweeper optimises)."""

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ethos import checkpoint
from ethos.checks import check, check_pretrained
from ethos.config import instantiate
from ethos.console import one_line_per_message, print_config
from ethos.pretrained import load_backbone
from ethos.rundir import find_resume_ckpt, set_aside_previous_run, write_status
from ethos.tasks.registry import task_for, task_target

log = logging.getLogger("ethos")


def start_point(cfg: DictConfig, out_dir: Path) -> tuple[str | None, str | None]:
    """(checkpoint to resume, weights to start from). Each is read once here, safely (ethos/checkpoint.py), so a
    wrong or unsafe file is a one-line error before any data is read. `ckpt_path=` a checkpoint without training
    state (e.g. an MLA-o retrofit) starts training at step 0 from its weights; once the run has saved, a requeue
    resumes the run's own last.ckpt."""
    ckpt = find_resume_ckpt(cfg.ckpt_path, cfg.resume, out_dir)
    if ckpt is None:
        return None, None
    state = checkpoint.load(ckpt, key="ckpt_path" if cfg.ckpt_path else "resume", mmap=True)
    if not cfg.ckpt_path or "optimizer_states" in state:
        return ckpt, None
    own = find_resume_ckpt(None, cfg.resume, out_dir)  # weights only: the run's own last.ckpt, once it has one
    if own:
        checkpoint.load(own, key="resume", mmap=True)
    return own, ckpt


def in_batches(trainer_cfg: DictConfig) -> dict:
    """Our `val_check_interval` counts optimizer steps; Lightning's counts training batches (micro-batches),
    so under gradient accumulation it is scaled. (ModelCheckpoint's every_n_train_steps already counts
    optimizer steps: Lightning's global_step.)"""
    accum, every = trainer_cfg.get("accumulate_grad_batches") or 1, trainer_cfg.get("val_check_interval")
    if accum > 1 and isinstance(every, int):  # a float is a fraction of the run: no unit to convert
        return {"val_check_interval": every * accum}
    return {}


def epoch_budget(epochs: int | None, datamodule, world_size: int, accumulate: int) -> dict:
    """`trainer.max_epochs` (fine-tuning protocols count passes over the data, e.g. GLUE's 3 epochs) as Trainer
    arguments: the step budget of that many passes over the train split, validated after each pass. Every run is
    one step-based Lightning epoch (the step sampler spans the run), so passes become max_steps, not epochs."""
    if epochs is None or epochs <= 0:
        return {}
    per_pass = datamodule.num_train_samples // (datamodule.batch_size * world_size)  # micro-batches
    steps = max(1, epochs * per_pass // accumulate)
    log.info(f"trainer.max_epochs={epochs}: {steps} steps ({per_pass} micro-batches of "
             f"{datamodule.batch_size} x {world_size} per pass), validated after each pass")
    return {"max_steps": steps, "max_epochs": -1, "val_check_interval": per_pass}


def recipe(cfg: DictConfig) -> dict:
    """What a checkpoint carries to rebuild its model without this config (ethos.pretrained.load_task): the
    task class, the resolved model config, and the data and seed it trained on. The task's own arguments
    (vocab size, pad id, head options) are Lightning's `hyper_parameters` beside it."""
    return {"task": task_target(cfg), "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.seed}


def finish_wandb() -> None:
    """Close the W&B run whatever happened, so the next job of a multirun starts cleanly."""
    try:
        import wandb  # optional at run time: logger=csv runs need no W&B
    except ImportError:
        return
    if wandb.run is not None:
        try:
            wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
        except Exception as e:  # e.g. SLURM's SIGTERM killed W&B's service too: must not mask the exit status
            log.warning(f"W&B did not finish cleanly: {e!r}")


def fit(cfg: DictConfig, checked: tuple | None = None) -> float | None:
    """`checked`: what `check(cfg)` returned, when the caller has already checked it."""
    model_cfg, optim = checked or check(cfg)
    if cfg.get("pretrained"):  # before any data is read
        check_pretrained(cfg)
    one_line_per_message()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt, init = start_point(cfg, out_dir)

    import lightning as L  # after every check: a bad config is reported without the import

    if cfg.resume == "never" and not cfg.ckpt_path:
        set_aside_previous_run(out_dir, L.pytorch.utilities.rank_zero_only.rank)
    write_status(out_dir, "running")
    if cfg.print_config:
        print_config(cfg)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)  # constructors only check arguments; nothing is read yet
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]

    def trainer_with(**kw):  # a copy of the list: the Trainer appends its default callbacks to the one it gets
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=list(callbacks),
                           **{**in_batches(cfg.trainer), **kw})

    trainer = trainer_with()
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        budget = epoch_budget(cfg.trainer.get("max_epochs"), datamodule, trainer.world_size,
                              trainer.accumulate_grad_batches)
        if budget:  # the Trainer takes its length at construction: build it again with the steps of the passes
            trainer = trainer_with(**budget)
        task = task_for(cfg)(model=model_cfg, optim=optim, **datamodule.task_kwargs())
        task.recipe = recipe(cfg)
        if init and not ckpt:
            load_backbone(task.model, init, key="ckpt_path")
            log.info(f"starting from the weights of {init} (no training state in it: step 0)")
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if ckpt:
            log.info(f"resuming from {ckpt}")
        elif cfg.validate_first:
            trainer.validate(task, datamodule=datamodule, verbose=False)  # the untrained baseline
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        except SystemExit:  # GracefulStop saved during validation and left it: not finished
            write_status(out_dir, "interrupted", trainer.global_step)
            raise
        if getattr(task, "interrupted", False):  # the exit status of the signal (GracefulStop): never 0
            write_status(out_dir, "interrupted", trainer.global_step)
            log.warning(f"interrupted at step {trainer.global_step}: re-run the same command to resume")
            sys.exit(task.interrupted)  # SystemExit: a multirun job must not be recorded as a finished one
        write_status(out_dir, "done", trainer.global_step)
        history = getattr(task, "val_history", [])
        if history:
            log.info(f"val/loss {history[0][1]:.3f} (step {history[0][0]}) -> {history[-1][1]:.3f} "
                     f"(step {history[-1][0]}); run dir {out_dir}")
        metric = trainer.callback_metrics.get("val/loss")
        return float(metric) if metric is not None else None
    finally:
        finish_wandb()

