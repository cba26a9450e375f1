"""Loading pretrained runs: a backbone for fine-tuning (strict, with one-line errors that name what differs), or
a whole task rebuilt from its self-describing checkpoint (for the analysis tools)."""

from pathlib import Path

from hydra.utils import get_class

from ethos import checkpoint
from ethos.config import instantiate
from ethos.errors import ConfigError
from ethos.rundir import checkpoint_path

PRETRAINING_HEADS = ("mlm_bias",)  # pretraining-only weights a fine-tune leaves behind


def load_backbone(backbone, pretrained: str | Path, new: tuple[str, ...] = (), key: str = "pretrained") -> str:
    """Copy the checkpoint's `model.*` weights into `backbone`, tensor for tensor. Every backbone weight must
    come from the checkpoint with its shape, except those under the `new` prefixes (a fresh head, kept as
    initialised); only pretraining heads may be left over. Returns the checkpoint path."""
    path = checkpoint_path(pretrained, key)
    state = checkpoint.load(path, key=key)["state_dict"]
    saved = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    saved = {k: v for k, v in saved.items() if not k.startswith(new or ("\0",))}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith(new or ("\0",))}
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(k for k in set(saved) - set(own) if k not in PRETRAINING_HEADS)
    shapes = sorted(k for k in set(own) & set(saved) if own[k].shape != saved[k].shape)  # heads are not in own
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + ", ".join(f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"not in the checkpoint: {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"only in the checkpoint: {', '.join(unexpected[:4])}"
                         + (" ..." if len(unexpected) > 4 else ""))
        raise ConfigError(f"{key}={pretrained}: the model config does not match the pretrained run's "
                          f"(variant or sizes): {'; '.join(parts)}")
    result = backbone.load_state_dict({k: saved[k] for k in own}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(new) for k in result.missing_keys), result
    return str(path)


def load_task(pretrained: str | Path, map_location="cpu"):
    """The task (LightningModule) a checkpoint holds, rebuilt from the checkpoint alone: its `ethos` record (task
    class, resolved model config; ethos.fit.recipe) and Lightning's `hyper_parameters`, then its weights loaded
    strictly. Returns (task in eval mode, the checkpoint dict). No Hydra config or run dir is needed."""
    from ethos.optim import OptimConfig  # imports torch: not before the config is checked (ethos/fit.py imports us)

    path = checkpoint_path(pretrained)
    ckpt = checkpoint.load(path, key="pretrained", map_location=map_location)
    record = ckpt.get("ethos")
    if not record:
        raise ConfigError(f"pretrained={pretrained}: the checkpoint does not describe its model (no 'ethos' "
                          "record: written before checkpoints carried their config); rebuild it from the run's "
                          ".hydra/config.yaml")
    options = dict(ckpt.get("hyper_parameters", {}))
    if "pretrained" in options:
        options["pretrained"] = None  # the weights come from this checkpoint, not from the run it started from
    model_cfg = instantiate(record["model"], _convert_="object")
    task = get_class(record["task"])(model=model_cfg, optim=OptimConfig(), **options)
    task.load_state_dict(ckpt["state_dict"])
    task.recipe = record
    return task.eval(), ckpt
