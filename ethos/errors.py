class ConfigError(ValueError):
    """Bad configuration: the message is one line naming the key, the value and what is valid."""
