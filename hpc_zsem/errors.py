"""Exceptions for expected, user-facing failures: each carries a one-line message that names the file or key
and what was expected. The CLI prints the message (no traceback) and exits with ``exit_code``."""


class HpcZsemError(Exception):
    """Base class of all expected errors (bad config, bad input, refused output)."""

    exit_code = 2


class ConfigError(HpcZsemError):
    """A config file or ``--set`` override is invalid; the message names the key."""


class InputError(HpcZsemError):
    """An input image cannot be used; the message names the file and what was expected."""


class OutputError(HpcZsemError):
    """An output cannot be written (exists without --overwrite, directory missing or not writable)."""
