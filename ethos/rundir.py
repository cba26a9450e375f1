"""The run dir: its name, its layout and its status. One home for what the entry point, the study table, the
fine-tune chain and the analysis tools all need to know about a run dir, so that none of them imports another.

    <run dir>/config_resolved.yaml   the composed config (and Hydra's .hydra/)
             checkpoints/last.ckpt   resume point; best-step*.ckpt ranked by val/loss
             csv/metrics.csv         every logged number (the results table reads it)
             wandb/, wandb_id.txt    the W&B run, resumed by id
             status.json             running | done | interrupted | failed, and the multirun it belongs to
             tokenizer/              the run's tokenizer (text)
             previous/<time>/        what resume=never set aside
"""

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from ethos.errors import ConfigError
from ethos.files import atomic_write

log = logging.getLogger("ethos")

STATUS_FILE = "status.json"
RUN_STATE = ("checkpoints", "csv", "wandb", "wandb_id.txt", STATUS_FILE)  # what a fresh run must not continue
MAX_NAME = 120  # file-system limits leave room for this and the paths under it


def run_dir_name(run_name: str | None, override_dirname: str, swept: str | list[str] | None = None) -> str:
    """Stable run directory name: explicit run_name, else the overrides, else 'default'. A name over MAX_NAME
    characters is shortened, ending in a hash of the whole: in a multirun (`swept`: the keys its command line
    sweeps, ETHOS_SWEPT) the swept overrides stay whole, since they are what tell its runs apart, and the
    overrides its runs share give way first; otherwise the name keeps a readable head."""
    name = run_name or override_dirname or "default"
    safe = _safe(name)
    if len(safe) <= MAX_NAME:
        return safe
    keys = set(swept.split(",") if isinstance(swept, str) else swept or ()) - {""}
    if run_name or not keys:
        return f"{safe[:100]}-{hashlib.sha1(safe.encode()).hexdigest()[:10]}"
    # hashed as Hydra wrote it: two override sets that differ only where _safe puts "_" keep apart
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    room = MAX_NAME - len(digest) - 1
    items = [(_key(item), _safe(item)) for item in override_items(override_dirname)]
    kept = [i for i, (key, _) in enumerate(items) if key in keys]
    length = sum(len(items[i][1]) + 1 for i in kept) - 1
    if length > room:  # the swept values alone are too long: their head
        return f"{','.join(items[i][1] for i in kept)[:room]}-{digest}"
    for i, (key, text) in enumerate(items):  # then the shared ones that fit, in Hydra's order
        if key not in keys and length + 1 + len(text) <= room:
            kept.append(i)
            length += 1 + len(text)
    return f"{','.join(items[i][1] for i in sorted(kept))}-{digest}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)


def _key(item: str) -> str:
    """The key of a key=value item, without Hydra's +, ++ or ~ (a key holds no "=")."""
    return item.split("=", 1)[0].lstrip("+~")


def override_items(override_dirname: str) -> list[str]:
    """The key=value items of Hydra's override_dirname (joined by ","): a comma inside brackets, braces,
    parentheses or quotes, or escaped (\\,), is part of its value."""
    items, start, depth, quote, escaped = [], 0, 0, None, False
    for i, c in enumerate(override_dirname):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(override_dirname[start:i])
            start = i + 1
    return [*items, override_dirname[start:]]


def swept_keys(args: list[str]) -> list[str]:
    """The keys a multirun's command line sweeps (experiment=a,b; seed=range(3); model=glob(*)), as Hydra parses
    them, sorted; Hydra's own (hydra/launcher=..., hydra.launcher.x=a,b) name no run. What `run_dir_name` keeps
    whole, passed to the jobs as ETHOS_SWEPT."""
    parser = OverridesParser.create()
    keys = set()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # -m, --config-name and its value, ~key deletions
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException:  # Hydra itself reports it, in its words
            continue
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and not (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            keys.add(key)
    return sorted(keys)


def run_dir_of(pretrained: str | Path) -> Path:
    """The run dir a `pretrained=` value names: itself, or for <run dir>/checkpoints/x.ckpt its run dir. Nothing
    is read (the config resolver calls it; whether the checkpoint exists is `checkpoint_path`'s check)."""
    path = Path(pretrained).expanduser()
    return path.parent.parent if path.suffix == ".ckpt" else path


def checkpoint_path(pretrained: str | Path, key: str = "pretrained") -> Path:
    """A run dir -> its checkpoints/last.ckpt; a file -> itself."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"{key}={pretrained}: no checkpoint there (a run dir with checkpoints/last.ckpt, "
                          "or a .ckpt file)")
    return path


def write_status(run_dir: Path, status: str, step: int | None = None, error: str | None = None) -> None:
    """<run dir>/status.json: running, done, interrupted or failed, with the multirun it belongs to."""
    record = {"status": status, "step": step, "error": error, "group": os.environ.get("ETHOS_GROUP"),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATUS_FILE, json.dumps(record))


def read_status(run_dir: Path) -> str | None:
    return (read_status_record(run_dir) or {}).get("status")


def read_status_record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def find_resume_ckpt(ckpt_path: str | None, resume: str, out_dir: Path) -> str | None:
    """The checkpoint a run continues from: `ckpt_path` if given, else with resume=auto the run dir's last.ckpt."""
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return str(path)
    last = out_dir / "checkpoints" / "last.ckpt"
    if resume == "auto" and last.is_file():
        return str(last)
    return None


def set_aside_previous_run(out_dir: Path, rank: int = 0) -> None:
    """resume=never in a used run dir: a fresh run, with its own logs and W&B run. The previous run's
    checkpoints and logs are moved to <run dir>/previous/<time>/, not deleted."""
    found = [out_dir / name for name in RUN_STATE if (out_dir / name).exists()]
    if not found or rank != 0:  # one mover: srun starts every rank of the job at once
        return
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.rename(dest / path.name)
    log.warning(f"resume=never: the previous run's {', '.join(p.name for p in found)} moved to {dest}")
