"""User-facing errors.

Every problem caused by the user's input (a missing folder, a misspelt config key, a
corrupt checkpoint) is raised as :class:`AttnReidError` with one line that names the
offending path or key and says what was expected. The CLI prints that line and exits
with status 2, never a traceback. Library users catch the same exception type.
"""

from __future__ import annotations


class AttnReidError(Exception):
    """A problem with the user's input, described in one line."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a newline would make the CLI message look like a traceback.
        super().__init__(" ".join(str(message).split()))


class ConfigError(AttnReidError):
    """A config file, key, type or value is wrong."""


class DataError(AttnReidError):
    """A dataset folder, file name or image is missing or malformed."""


class CheckpointError(AttnReidError):
    """A checkpoint is missing, truncated or belongs to another model."""
