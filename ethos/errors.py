import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """Bad configuration: the message is one line naming the key, the value and what is valid."""

    kind = "config error"


class DataUnavailable(ConfigError):
    """The data cannot be read (no network, no local copy): one line saying what to do instead."""

    kind = "data unavailable"


@contextmanager
def exits_on_config_error() -> Iterator[None]:
    """For the analysis tools' `main`: a ConfigError becomes its one line on stderr and exit status 2."""
    try:
        yield
    except ConfigError as e:
        print(f"ethos: {e.kind}: {e}", file=sys.stderr)
        sys.exit(2)
