"""The user-facing error: a refusal that the CLI prints as one line (exit 2) and the server as
HTTP 400. Everything else that escapes is a bug and keeps its traceback."""


class ConfigError(ValueError):
    """A user-facing configuration error (bad preset, bad schedule, bad path, ...)."""
