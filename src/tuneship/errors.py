"""User-facing errors.

A `TuneshipError` carries one line that names what is wrong and how to fix it. The CLI prints it as
`error: <message>` and exits with status 2, with no traceback. Anything else is a bug and keeps its traceback.
"""


class TuneshipError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
