"""`python train.py` / `ethos-train`: compose the config, check it, then data, model, trainer, fit.

Order matters for users: every config mistake is reported in one line before any data is read or
any large module is imported.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ethos.config import CONF_DIR, register_resolvers, validate
from ethos.errors import ConfigError
from ethos.rundir import (
    checkpoint_path,
    find_resume_ckpt,
    read_status,
    run_dir_name,
    set_aside_previous_run,
    write_status,
)

log = logging.getLogger("ethos")


def print_config(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(Syntax(text, "yaml", theme="ansi_dark"))
    Console().print(tree)


def weights_only(path: str) -> bool:
    """A checkpoint without training state (optimizer, loops): written by ethos.analysis.retrofit, not a resume."""
    from ethos import checkpoint

    return "optimizer_states" not in checkpoint.load(path, key="ckpt_path", mmap=True)


def build_model_config(cfg: DictConfig):
    """Instantiate and dry-build the model on the meta device: catches every size mistake in ~1 s."""
    import torch

    from ethos.config import instantiate
    from ethos.tasks.registry import backbone_for

    model_cfg = instantiate(cfg.model, _convert_="object")
    with torch.device("meta"):
        backbone_for(cfg)(model_cfg)
    return model_cfg


def check(cfg: DictConfig):
    """Every check that needs no data: types and keys of every group, a dry build of the model on the meta
    device, rules across groups. Returns (model config, optim config)."""
    from ethos.config import instantiate

    validate(cfg)  # types and keys from the signatures, cached (ethos/signatures.py): no Lightning import
    model_cfg = build_model_config(cfg)
    check_across_groups(cfg)
    return model_cfg, instantiate(cfg.optim)


def check_across_groups(cfg: DictConfig) -> None:
    from ethos.tasks.registry import modality, task_target

    task_target(cfg)  # the task fits the data
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and epochs > 0:
        from hydra.utils import get_class

        if not hasattr(get_class(cfg.data._target_), "num_train_samples"):
            raise ConfigError(f"trainer.max_epochs={epochs}: the data module {cfg.data._target_.rsplit('.', 1)[-1]} "
                              "is step-based (a stream of blocks): set trainer.max_steps and trainer.max_epochs=-1")
    if cfg.trainer.get("max_steps") is None:
        raise ConfigError("trainer.max_steps=null: pretraining is step-based, set a positive number of steps")
    if cfg.optim.get("fused") and cfg.trainer.get("gradient_clip_val") and "mixed" in str(cfg.trainer.precision):
        raise ConfigError(f"optim.fused=true: Lightning cannot clip the gradients of a fused optimizer under "
                          f"trainer.precision={cfg.trainer.precision} (trainer.gradient_clip_val="
                          f"{cfg.trainer.gradient_clip_val}); set optim.fused=null or trainer.gradient_clip_val=null")
    patch = cfg.task.get("patch_size") if cfg.get("task") else None
    if modality(cfg) == "image" and patch and cfg.data.img_size % patch:
        raise ConfigError(f"task.patch_size={patch}: must divide data.img_size={cfg.data.img_size} (null: chosen "
                          "from the image size)")
    if modality(cfg) == "text" and cfg.model.learned_pos and cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: longer than model.max_seq_len={cfg.model.max_seq_len}"
                          " (the learned position table); raise model.max_seq_len or lower data.seq_len")


def one_line_per_message() -> None:
    """Lightning gives the `lightning` logger a console handler of its own and still propagates to the
    root logger, where Hydra's handler prints every record a second time: keep Hydra's (it also writes
    the run's log file). Its advertising tips go."""
    import lightning  # noqa: F401  (adds the handler on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "ethos_tips", False) for f in tips.filters):
        no_tips = lambda record: not record.getMessage().startswith("💡 Tip")
        no_tips.ethos_tips = True
        tips.addFilter(no_tips)


def epochs_to_steps(cfg: DictConfig, trainer, datamodule) -> None:
    """`trainer.max_epochs` (fine-tuning protocols count passes over the data, e.g. GLUE's 3 epochs): the step
    budget of that many passes over the train split, validated after each pass. Every run is one step-based
    Lightning epoch (the step sampler spans the run), so the passes become max_steps, not Lightning epochs."""
    epochs = cfg.trainer.get("max_epochs")
    if epochs is None or epochs <= 0:
        return
    per_pass = datamodule.num_train_samples // (datamodule.batch_size * trainer.world_size)  # micro-batches
    steps = max(1, epochs * per_pass // trainer.accumulate_grad_batches)
    trainer.fit_loop.epoch_loop.max_steps, trainer.fit_loop.max_epochs = steps, -1
    trainer.val_check_interval = per_pass
    log.info(f"trainer.max_epochs={epochs}: {steps} steps ({per_pass} micro-batches of "
             f"{datamodule.batch_size} x {trainer.world_size} per pass), validated after each pass")


def in_batches(trainer_cfg: DictConfig) -> dict:
    """Our `val_check_interval` counts optimizer steps; Lightning's counts training batches (micro-batches),
    so under gradient accumulation it is scaled. (ModelCheckpoint's every_n_train_steps already counts
    optimizer steps: Lightning's global_step.)"""
    accum, every = trainer_cfg.get("accumulate_grad_batches") or 1, trainer_cfg.get("val_check_interval")
    if accum > 1 and isinstance(every, int):  # a float is a fraction of the run: no unit to convert
        return {"val_check_interval": every * accum}
    return {}


def train(cfg: DictConfig) -> float | None:
    """One run; with `finetune_after`, then the fine-tune of what it trained (ethos/study.py). Returns the
    pretraining's final val/loss (what a sweeper optimises)."""
    metric = fit(cfg)
    if cfg.get("finetune_after"):
        from ethos.study import finetune_config

        ft = finetune_config(cfg, Path(cfg.paths.output_dir))
        try:
            train(ft)
        except Exception as e:  # marked on the fine-tune; the pretraining run stays done (see _main)
            write_status(Path(ft.paths.output_dir), "failed", error=f"{type(e).__name__}: {e}")
            raise
    return metric


def fit(cfg: DictConfig) -> float | None:
    from ethos.config import instantiate

    model_cfg, optim = check(cfg)
    if cfg.get("finetune_after"):  # the fine-tune's config is checked now, not after hours of pretraining
        from ethos.study import finetune_config

        check(finetune_config(cfg, Path(cfg.paths.output_dir)))
    if cfg.get("pretrained"):  # before any data is read
        checkpoint_path(cfg.pretrained)
    one_line_per_message()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = find_resume_ckpt(cfg.ckpt_path, cfg.resume, out_dir)
    init = None  # ckpt_path=<weights only> (e.g. an MLA-o retrofit): training starts at step 0 from those weights,
    if ckpt and cfg.ckpt_path and weights_only(ckpt):  # and once it has saved, a requeue resumes its own run
        init, last = ckpt, out_dir / "checkpoints" / "last.ckpt"
        ckpt = str(last) if cfg.resume == "auto" and last.is_file() else None
    if cfg.resume == "never" and not cfg.ckpt_path:
        from lightning.pytorch.utilities import rank_zero_only

        set_aside_previous_run(out_dir, rank_zero_only.rank)
    write_status(out_dir, "running")

    import lightning as L

    from ethos.tasks.registry import task_for

    if cfg.print_config:
        print_config(cfg)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)  # constructors only check arguments; nothing is read yet
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **in_batches(cfg.trainer))
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        epochs_to_steps(cfg, trainer, datamodule)
        task = task_for(cfg)(model=model_cfg, optim=optim, **datamodule.task_kwargs())
        task.recipe = recipe(cfg)
        if init and not ckpt:
            from ethos.pretrained import load_backbone

            load_backbone(task.model, init)
            log.info(f"starting from the weights of {init} (no training state in it: step 0)")
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if ckpt:
            log.info(f"resuming from {ckpt}")
        elif cfg.validate_first:
            trainer.validate(task, datamodule=datamodule, verbose=False)  # the untrained baseline
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt)
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


def recipe(cfg: DictConfig) -> dict:
    """What a checkpoint carries to rebuild its model without this config (ethos.pretrained.load_task): the
    task class, the resolved model config, and the data and seed it trained on. The task's own arguments
    (vocab size, pad id, head options) are Lightning's `hyper_parameters` beside it."""
    from ethos.tasks.registry import task_target

    return {"task": task_target(cfg), "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.seed}


def finish_wandb() -> None:
    """Close the W&B run whatever happened, so the next job of a multirun starts cleanly."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        try:
            wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
        except Exception as e:  # e.g. SLURM's SIGTERM killed W&B's service too: must not mask the exit status
            log.warning(f"W&B did not finish cleanly: {e!r}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(cfg.paths.output_dir)

    def mark(run_dir: Path, status: str, **kw) -> None:
        if read_status(run_dir) != "done":  # a finished pretraining whose fine-tune (finetune_after) failed stays
            write_status(run_dir, status, **kw)    # done: the fine-tune's own dir says what failed

    try:
        return train(cfg)
    except ConfigError as e:
        if multirun:  # the sweep's table shows the job that never started
            mark(run_dir, "failed", error=str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"ethos: {e.kind}: {e}", file=sys.stderr)
        if multirun:
            return None  # one bad job of a sweep must not stop the others
        sys.exit(2)
    except Exception as e:  # not SystemExit: a job stopped by a signal exits non-zero so SLURM requeues it
        from ethos.callbacks.resume import RECEIVED, exit_status

        if RECEIVED["signum"]:  # whatever broke after a stop signal (the scheduler killing W&B's service,
            log.exception("stopped by a signal")  # submitit out of requeues): not a finished job
            mark(run_dir, "interrupted")
            sys.exit(exit_status(RECEIVED["signum"]))
        mark(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        if multirun:
            log.exception("job failed; the sweep goes on")
            return None
        raise


def main() -> None:
    # Lightning 2.6 vs torch 2.14 internals; says nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # our train sampler restarts from the restored global step (ethos/data/sampling.py), which
    # Lightning cannot see: its "dataloader is not resumable" warning does not apply
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    # a streaming train loader's length is the run's by construction (one reader, ethos/data/text.py), so
    # Lightning's caveat about lengths of iterable datasets read by several workers does not apply
    warnings.filterwarnings("ignore", message=r".*IterableDataset.* has .__len__. defined")
    register_resolvers()
    name_multirun(sys.argv[1:])
    _main()


def name_multirun(args: list[str]) -> None:
    """Hydra gives a multirun no name its jobs can read: name it after its overrides and pass that by
    the environment (SLURM jobs inherit it), so that all its runs share one W&B group."""
    if "-m" in args or "--multirun" in args:
        overrides = [a for a in args if "=" in a and not a.lstrip("+~").startswith("hydra")]
        os.environ.setdefault("ETHOS_GROUP", run_dir_name(None, ",".join(overrides)))


if __name__ == "__main__":
    main()
