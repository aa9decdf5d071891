"""The one exception type the data layer raises for problems with the user's data."""
from __future__ import annotations


class DataError(Exception):
    """A user-facing data problem: missing directory, no images, malformed file, unknown name.

    The message is always a single line that names the problem (and usually the path), so a
    command-line tool can print it as-is instead of a traceback.
    """

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


class MissingSplit(DataError):
    """The requested split (e.g. ``train/``) is absent from an otherwise valid dataset root."""
