"""What tells the groups of a results table apart: each group is named by the overrides that differ between
groups, and what every run shares is said once. Overrides are read as Hydra reads a command line, so a value's
brackets, quotes and commas (finetune_after.overrides=["optim.lr=1e-3", ...]) stay in it."""

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

WITHIN = ("seed",)  # what varies within a group: its runs repeat one setting


def parse_line(line: str, parser: OverridesParser | None = None) -> tuple[str, str]:
    """(key without Hydra's +, ++ or ~; its value as Hydra reads it, to compare: `[a, b]` and `["a","b"]` are one
    value)."""
    try:
        (override,) = (parser or OverridesParser.create()).parse_overrides([line])
    except OverrideParseException:  # not Hydra's syntax (a record written by hand): compared as written
        return line.split("=", 1)[0].lstrip("+~"), line
    return override.get_key_element().lstrip("+~"), ("~" if override.is_delete() else "") + repr(override.value())


def parse(lines: list[str]) -> dict[str, tuple[str, str]]:
    """key -> (its value to compare, the line as written to show)."""
    parser = OverridesParser.create()
    parsed = {}
    for line in lines:
        key, value = parse_line(line, parser)
        parsed[key] = (value, line)
    return parsed


def describe(runs: list[list[str] | None]) -> tuple[list[str | None], list[str]]:
    """Each run's group name and the overrides all the runs share (as written). A group is named by the
    overrides whose value is not the same in every run, but for WITHIN: "(all)" when nothing differs,
    "(defaults)" for the runs that have none of those. A run whose overrides are unknown (None: no Hydra record)
    takes no part and gets None."""
    each = [parse(r) if isinstance(r, list) else None for r in runs]
    known = [p for p in each if p is not None]
    keys = sorted({k for p in known for k in p})
    shared = [k for k in keys if all(k in p for p in known) and len({p[k][0] for p in known}) == 1]
    differing = [k for k in keys if k not in shared and k not in WITHIN]
    shown = {}  # one spelling per value: the first run's that has it
    for p in known:
        for k in differing:
            if k in p:
                shown.setdefault((k, p[k][0]), p[k][1])
    empty = "(defaults)" if differing else "(all)"
    names = [None if p is None else " ".join(shown[k, p[k][0]] for k in differing if k in p) or empty for p in each]
    return names, [known[0][k][1] for k in shared]
