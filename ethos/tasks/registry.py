"""The data modality and `objective` choose backbone and task; `model=` only chooses the blocks.

Each entry: task class, backbone class and the placeholder sizes for the dry build on the meta
device (run before any data is read, to check the model config). Paths are strings so nothing
heavy is imported before the config is known to be good.
"""

from omegaconf import DictConfig

from ethos.errors import ConfigError

TASKS = {
    ("text", "mlm"): ("ethos.tasks.mlm.MaskedLM", "ethos.models.encoder.Encoder", {"vocab_size": 8}),
    ("image", "cls"): ("ethos.tasks.classify.ImageClassifier", "ethos.models.vit.ViT",
                       {"num_classes": 10, "img_size": 32, "patch_size": 4}),
    ("text", "clm"): ("ethos.tasks.clm.CausalLM", "ethos.models.decoder.Decoder", {"vocab_size": 8}),
    ("text-classification", "cls"): ("ethos.tasks.finetune.SequenceClassifier", "ethos.models.encoder.Encoder",
                                     {"vocab_size": 8}),
}
DEFAULT_OBJECTIVE = {"text": "mlm", "image": "cls", "text-classification": "cls"}


def modality(cfg: DictConfig) -> str:
    """The data module's `modality` (read through the config check's cache: no import once known)."""
    from ethos.config import target_info

    return target_info(cfg, cfg.data._target_, "data").modality or "text"


def _entry(cfg: DictConfig) -> tuple[str, str, dict]:
    mod = modality(cfg)
    objective = cfg.get("objective") or DEFAULT_OBJECTIVE.get(mod)
    if (mod, objective) not in TASKS:
        valid = sorted(o for m, o in TASKS if m == mod)
        raise ConfigError(f"objective={objective!r}: valid for {mod} data are {', '.join(valid)}")
    return TASKS[mod, objective]


def backbone_for(cfg: DictConfig):
    """A callable model_cfg -> nn.Module with placeholder sizes, for the dry build."""
    from hydra.utils import get_class

    _, backbone, placeholder = _entry(cfg)
    cls = get_class(backbone)
    return lambda model_cfg: cls(model_cfg, **placeholder)


def check_task(cfg: DictConfig) -> None:
    """`task=` (conf/task/) gives the task's own options; its class must be the one the data calls for."""
    if cfg.get("task"):
        want, got = _entry(cfg)[0], cfg.task._target_
        if got != want:
            needs = sorted({m for (m, _), entry in TASKS.items() if entry[0] == got}) or ["other"]
            raise ConfigError(f"task._target_={got}: trains on {' or '.join(needs)} data, but the data module "
                              f"{cfg.data._target_.rsplit('.', 1)[-1]} gives {modality(cfg)} data (for it: "
                              f"{want.rsplit('.', 1)[-1]}, no task=)")


def task_for(cfg: DictConfig):
    """The task class, or with `task=` the class with that config's options bound (a partial)."""
    from hydra.utils import get_class

    check_task(cfg)
    if cfg.get("task"):
        from ethos.config import instantiate

        return instantiate(cfg.task, _partial_=True)
    return get_class(_entry(cfg)[0])
