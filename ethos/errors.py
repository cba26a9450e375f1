class ConfigError(ValueError):
    """Bad configuration: the message is one line naming the key, the value and what is valid."""

    kind = "config error"


class DataUnavailable(ConfigError):
    """The data cannot be read (no network, no local copy): one line saying what to do instead."""

    kind = "data unavailable"
