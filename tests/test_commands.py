"""Every documented command composes and dry-builds; every debug option composes with every data option.

Commands are read from where users read them: README.md, sweeps/ (Markdown and W&B sweep files),
docker/README.md and the comments of ethos/conf/. Each is composed the way `python train.py ... --cfg job`
would compose it (multirun sweeps expanded into their jobs), then checked like a real run is before
any data is read: types and keys of every group, rules across groups, a dry build of the model on the
meta device and the data module's constructor.
"""

import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from ethos.checks import check
from ethos.config import CONF_DIR, instantiate, register_resolvers
from ethos.errors import ConfigError

FLAGS = {"-m", "--multirun", "--cfg", "job", "hydra", "all", "--resolve"}
OVERRIDE = re.compile(r"^[+~]{0,2}[\w./@-]+=")


def command_lines(path: Path) -> list[tuple[str, str | None]]:
    """The `python train.py ...` commands in a file (inline code, code blocks, comments), each with the
    error it is documented to print: a `$ python train.py ...` line followed by an `ethos: ...` line."""
    found = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        for m in re.finditer(r"python train\.py([^`\n]*)", line):
            after = lines[i + 1] if i + 1 < len(lines) else ""
            error = after if line.lstrip().startswith("$ ") and after.startswith("ethos: ") else None
            found.append((m.group(1), error))
    return found


def parse(rest: str) -> tuple[list[str], bool]:
    """Overrides of one command and whether it is a multirun; stops at the first word that is
    neither an override nor a Hydra flag (a trailing comment or description)."""
    kept, multirun = [], False
    for tok in rest.split():  # words first: a description after the command may hold a lone quote
        if tok in ("-m", "--multirun"):
            multirun = True
        elif tok in FLAGS:
            continue
        elif OVERRIDE.match(tok):
            kept.append(tok)
        else:
            break
    return shlex.split(" ".join(kept)), multirun


def documented() -> list[tuple[str, list[str], bool, str | None]]:
    files = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "sweeps").glob("*.md")),
             *sorted(CONF_DIR.rglob("*.yaml"))]
    out = []
    for f in files:
        for rest, error in command_lines(f):
            args, multirun = parse(rest)
            out.append((f"{f.relative_to(ROOT)}: python train.py{rest.split('#')[0].rstrip()}", args, multirun,
                        error))
    return out


def wandb_sweeps() -> list[tuple[str, list[str], bool, str | None]]:
    """W&B sweep files: the agent passes each grid point as Hydra overrides (${args_no_hyphens})."""
    out = []
    for f in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text())
        assert "${args_no_hyphens}" in spec["command"], f"{f}: the agent must pass Hydra overrides"
        keys = list(spec["parameters"])
        for values in itertools.product(*(spec["parameters"][k]["values"] for k in keys)):
            out.append((f"{f.relative_to(ROOT)}: {values}", [f"{k}={v}" for k, v in zip(keys, values)], False,
                        None))
    return out


def jobs(args: list[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command: itself, or every combination of a multirun's sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [args]
    choices = []
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def compose_checked(overrides: list[str], tmp_path: Path):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    model_cfg, _ = check(cfg)
    data = instantiate(cfg.data)  # constructor only: checks arguments, reads nothing
    return cfg, model_cfg, data


COMMANDS = documented() + wandb_sweeps()


def test_commands_are_found():
    where = {c[0].split(":")[0] for c in COMMANDS}
    assert "README.md" in where and any(w.startswith("sweeps/") for w in where)
    assert any(w.startswith("ethos/conf/experiment/") for w in where)
    assert len(COMMANDS) >= 20, len(COMMANDS)


@pytest.mark.slow  # ~170 end-to-end command lines of the docs, ~90 s; every option's own check is in the fast tier
@pytest.mark.parametrize("where,args,multirun,error", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes_and_builds(where, args, multirun, error, tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()  # what the local-files example points at, relative to the working dir
    (tmp_path / "corpus" / "a.txt").write_text("one document per line\n")
    monkeypatch.chdir(tmp_path)
    assert "..." not in " ".join(args), f"{where}: a placeholder, not a command"
    for job in jobs(args, multirun):
        assert outcome(job, tmp_path) == error  # None: composed and built; else exactly the documented line


# job -> what checking it gave: None (composed and built) or its error line. The same job is documented in several
# places (the README, sweeps/, the experiment configs): each place is a test, each job is checked once.
OUTCOMES: dict[tuple[str, ...], str | None] = {}


def outcome(job: list[str], tmp_path: Path) -> str | None:
    key = tuple(job)
    if key not in OUTCOMES:
        try:
            compose_checked(job, tmp_path)
            OUTCOMES[key] = None
        except ConfigError as e:
            OUTCOMES[key] = f"ethos: {e.kind}: {e}"
    return OUTCOMES[key]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("debug", options("debug"))
@pytest.mark.parametrize("data", options("data"))
def test_every_debug_option_with_every_data_option(debug, data, tmp_path):
    from test_config import NEEDS

    cfg, _, dm = compose_checked([f"debug={debug}", f"data={data}", *NEEDS.get(f"data={data}", [])], tmp_path)
    assert dm.batch_size == cfg.data.batch_size


def test_a_broken_readme_command_would_fail(tmp_path):
    """The parser really reaches the compose step: a command with a bad option fails there."""
    args, _ = parse(" model=mha_typo   # choose a variant")
    assert args == ["model=mha_typo"]
    with pytest.raises(Exception, match="mha_typo"):
        compose_checked(args, tmp_path)
