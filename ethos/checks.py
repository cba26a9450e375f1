"""Every check of a composed config that needs no data, run before anything is read or trained: types and keys of
every group (ethos/config.py, from the signatures of the classes the config builds), a dry build of the model on
the meta device, and the rules across groups. Each failure is one ConfigError line naming the key."""

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ethos import checkpoint
from ethos.config import instantiate, pretrained_tokenizer, validate
from ethos.errors import ConfigError
from ethos.rundir import checkpoint_path
from ethos.tasks.registry import backbone_for, modality, task_target


def build_model_config(cfg: DictConfig):
    """Instantiate and dry-build the model on the meta device: catches every size mistake in ~1 s."""
    import torch  # after validate(): a bad value is reported before the 3 s import

    from ethos.models.lora import options, targets

    model_cfg = instantiate(cfg.model, _convert_="object")
    with torch.device("meta"):
        backbone = backbone_for(cfg)(model_cfg)
    lora = options(cfg.task.get("lora")) if cfg.get("task") else None
    if lora is not None:
        targets(backbone, lora)  # names that are not projections of this variant's blocks
    return model_cfg


def check(cfg: DictConfig):
    """Types and keys, the dry build, the rules across groups. Returns (model config, optim config)."""
    validate(cfg)  # types and keys from the signatures, cached (ethos/signatures.py): no Lightning import
    model_cfg = build_model_config(cfg)
    check_across_groups(cfg)
    return model_cfg, instantiate(cfg.optim)


def check_across_groups(cfg: DictConfig) -> None:
    target = task_target(cfg)  # the task fits the data
    if cfg.get("task") and hasattr(get_class(target), "check_options"):  # the task's own rules across its keys
        get_class(target).check_options(cfg)
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and epochs > 0:
        if not hasattr(get_class(cfg.data._target_), "num_train_samples"):
            raise ConfigError(f"trainer.max_epochs={epochs}: the data module {cfg.data._target_.rsplit('.', 1)[-1]} "
                              "is step-based (a stream of blocks): set trainer.max_steps and trainer.max_epochs=-1")
    if cfg.trainer.get("max_steps") is None:
        raise ConfigError("trainer.max_steps=null: pretraining is step-based, set a positive number of steps")
    if cfg.optim.get("fused") and cfg.trainer.get("gradient_clip_val") and "mixed" in str(cfg.trainer.precision):
        raise ConfigError(f"optim.fused=true: Lightning cannot clip the gradients of a fused optimizer under "
                          f"trainer.precision={cfg.trainer.precision} (trainer.gradient_clip_val="
                          f"{cfg.trainer.gradient_clip_val}); set optim.fused=null or trainer.gradient_clip_val=null")
    if cfg.optim.get("name") == "muon" and OmegaConf.select(cfg, "trainer.strategy._target_") == "ethos.parallel.FSDP":
        raise ConfigError("optim.name=muon: not with trainer=fsdp (trainer.strategy=ethos.parallel.FSDP): Muon "
                          "orthogonalises whole matrices, FSDP holds row shards; use trainer=ddp or optim=adamw")
    patch = cfg.task.get("patch_size") if cfg.get("task") else None
    if modality(cfg) == "image" and patch and cfg.data.img_size % patch:
        raise ConfigError(f"task.patch_size={patch}: must divide data.img_size={cfg.data.img_size} (null: chosen "
                          "from the image size)")
    if modality(cfg) == "text" and cfg.model.learned_pos and cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: longer than model.max_seq_len={cfg.model.max_seq_len}"
                          " (the learned position table); raise model.max_seq_len or lower data.seq_len")


def check_pretrained(cfg: DictConfig) -> None:
    """`pretrained=`: a checkpoint that reads safely (ethos/checkpoint.py), and for text the tokenizer its run dir
    keeps, unless data.tokenizer names another. Read before any data is."""
    path = checkpoint_path(cfg.pretrained)
    checkpoint.load(path, key="pretrained", mmap=True)
    tokenizer = cfg.data.get("tokenizer")
    if tokenizer and tokenizer == pretrained_tokenizer(cfg.pretrained) and not Path(tokenizer).is_dir():
        raise ConfigError(f"pretrained={cfg.pretrained}: no tokenizer at {tokenizer} (a checkpoint outside its run "
                          "dir's checkpoints/): set data.tokenizer=<the pretraining run's tokenizer dir>")
