"""Errors users see as one line on stderr (the CLI maps them; NLVID_DEBUG=1 shows the traceback).

exit_code: 1 = runtime failure (bad file, decode error, NaN loss), 2 = usage/config error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NlvidError(Exception):
    """Base class: a message a user can act on, without a traceback.

    `key`: the config key the message is about (e.g. "train.device"), when there is one. Library code names
    config keys; the CLI adds the command-line flag that sets the key.
    """

    exit_code = 1

    def __init__(self, *args, key: str | None = None):
        super().__init__(*args)
        self.key = key


class ConfigError(NlvidError, ValueError):
    """Unknown key, bad type or value, unknown model name, impossible shape (also a ValueError for library users)."""

    exit_code = 2


class DatasetError(NlvidError):
    """A dataset folder or annotation list that cannot be used, or one with no readable video."""

    exit_code = 1


class CheckpointError(NlvidError):
    """A checkpoint that is missing, corrupt, unsafe, or does not fit the model/data."""

    exit_code = 1


class DecodeError(NlvidError):
    """A video that cannot be decoded. `partial` holds the frames that did decode, if any (uint8 (T, H, W, 3))."""

    exit_code = 1

    def __init__(self, path: str | Path, reason: str, partial=None):
        self.path = str(path)
        self.reason = reason
        self.partial = partial
        super().__init__(f"{self.path}: {reason}")


class OutputError(NlvidError):
    """A result that cannot be written (disk full, read-only folder, a file where a folder is needed)."""

    exit_code = 1


@contextmanager
def writing(path: str | Path, what: str = "file") -> Iterator[None]:
    """Turn an OSError raised while writing `path` into one OutputError line naming it."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot write {what} ({e.strerror or e.__class__.__name__})") from None


class TrainingError(NlvidError):
    """A training run that has to stop (e.g. a NaN loss); the last good checkpoint is kept."""

    exit_code = 1


class ExportError(NlvidError):
    """An export that failed, does not run, or differs from eager; or an exported file nlvid cannot read back."""

    exit_code = 1
