"""The one exception type users see.

Anything that is the user's input being wrong (a missing path, a corrupt file,
a bad size, an unknown name) raises `StudioError` with a message that names the
input and says what to do. The CLI prints that message alone, with no traceback.

Example:
    >>> raise StudioError("width 100 is not a multiple of 8; use e.g. 96 or 104")  # doctest: +SKIP
"""


class StudioError(Exception):
    """A problem with the user's input, worded for the user: always one line (a name read from a damaged file may
    hold line breaks or other control characters: they are shown escaped, as in a Python string)."""

    def __init__(self, message: str = "") -> None:
        message = str(message)
        if not message.isprintable():
            message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        super().__init__(message)


class TrainingStopped(StudioError):
    """A training run was asked to stop (Ctrl-C, SIGTERM, the page's Stop) and saved a checkpoint to resume
    from: not an error (the CLI prints it without "error:", exit status 130)."""
