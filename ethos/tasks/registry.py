"""`task=` (ethos/conf/task/) chooses the LightningModule, and through it the backbone; without it the data's modality
chooses (text: masked LM, images: classification, labelled text: fine-tuning). `model=` only chooses the blocks.

Each task class: the modality of the data it trains on, its backbone and the placeholder sizes for the dry
build on the meta device (run before any data is read, to check the model config). Paths are strings so
nothing heavy is imported before the config is known to be good.
"""

from hydra.utils import get_class
from omegaconf import DictConfig

from ethos.config import instantiate, target_info
from ethos.errors import ConfigError

TASKS = {  # task class -> (data modality, backbone, placeholder sizes)
    "ethos.tasks.mlm.MaskedLM": ("text", "ethos.models.encoder.Encoder", {"vocab_size": 8}),
    "ethos.tasks.clm.CausalLM": ("text", "ethos.models.decoder.Decoder", {"vocab_size": 8}),
    "ethos.tasks.prefix_lm.PrefixLM": ("text", "ethos.models.decoder.Decoder", {"vocab_size": 8}),
    "ethos.tasks.seq2seq.Seq2Seq": ("text", "ethos.models.seq2seq.EncoderDecoder", {"vocab_size": 8}),
    "ethos.tasks.classify.ImageClassifier": ("image", "ethos.models.vit.ViT",
                                             {"num_classes": 10, "img_size": 32, "patch_size": 4}),
    "ethos.tasks.finetune.SequenceClassifier": ("text-classification", "ethos.models.encoder.Encoder",
                                                {"vocab_size": 8}),
}
DEFAULT_TASK = {"text": "ethos.tasks.mlm.MaskedLM", "image": "ethos.tasks.classify.ImageClassifier",
                "text-classification": "ethos.tasks.finetune.SequenceClassifier"}


def modality(cfg: DictConfig) -> str:
    """The data module's `modality` (read through the config check's cache: no import once known)."""
    return target_info(cfg, cfg.data._target_, "data").modality or "text"


def task_target(cfg: DictConfig) -> str:
    """The task class path: task._target_, or the data's default; it must train on the data's modality."""
    mod = modality(cfg)
    target = cfg.task._target_ if cfg.get("task") else DEFAULT_TASK.get(mod)
    if target not in TASKS:
        raise ConfigError(f"task._target_={target}: not a task (valid: {', '.join(TASKS)})")
    if TASKS[target][0] != mod:
        fits = [k.rsplit(".", 1)[-1] for k, v in TASKS.items() if v[0] == mod]
        raise ConfigError(f"task._target_={target}: trains on {TASKS[target][0]} data, but the data module "
                          f"{cfg.data._target_.rsplit('.', 1)[-1]} gives {mod} data (tasks for it: "
                          f"{', '.join(fits)})")
    return target


def backbone_for(cfg: DictConfig):
    """A callable model_cfg -> nn.Module with placeholder sizes, for the dry build."""
    _, backbone, placeholder = TASKS[task_target(cfg)]
    cls = get_class(backbone)
    return lambda model_cfg: cls(model_cfg, **placeholder)


def task_for(cfg: DictConfig):
    """The task class, or with `task=` the class with that config's options bound (a partial)."""
    target = task_target(cfg)
    if cfg.get("task"):
        return instantiate(cfg.task, _partial_=True)
    return get_class(target)
