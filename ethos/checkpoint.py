"""Reading checkpoint files safely. Every checkpoint ethos reads (a resume, `ckpt_path=`, `pretrained=`, the
analysis tools) goes through `load`: `torch.load(weights_only=True)`, which unpickles tensors and plain containers
only, plus the types on `ALLOWED` (none today: our checkpoints hold plain values). A checkpoint someone shared
cannot run code when it is read; a file that is not a checkpoint, or one that holds anything else, is a one-line
ConfigError naming the path (exit code 2 from the command line).
"""

import pickle
import re
import zipfile
from pathlib import Path

from ethos.errors import ConfigError

# Types beyond tensors and plain containers that our own checkpoints may hold, registered with
# torch.serialization.add_safe_globals. Empty: the task, schedule, sampler and callback states are stored as
# plain values (LambdaLR saves a callable object's attributes, not the object). Add a type only with a test
# that writes it (tests/test_checkpoint.py).
ALLOWED: list = []


def allow() -> None:
    """Register `ALLOWED` with torch; Lightning's own resume (trainer.fit(weights_only=True)) honours it too."""
    if ALLOWED:
        import torch  # 3 s: this module is imported before a config is checked (ethos/checks.py)

        torch.serialization.add_safe_globals(ALLOWED)


def refused_global(error: Exception) -> str | None:
    """The `module.name` that weights_only refused, from torch's message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def check_file(path: str | Path, key: str) -> Path:
    """The path, if it is a file in torch.save's format; else one line naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{key}={path}: not a PyTorch checkpoint (torch.save's zip format)")
    return path


def load(path: str | Path, key: str = "checkpoint", map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint dict at `path`, read with weights_only=True. `key` names the config key or argument the
    path came from, for the error line."""
    import torch  # see allow()

    path = check_file(path, key)
    allow()
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        name = refused_global(e) or "a global"
        raise ConfigError(f"{key}={path}: refused: it refers to {name}, which is not on the allowlist of checkpoint "
                          "types (tensors and plain values: reading a checkpoint must not run code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}={path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{key}={path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt
