"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class WorkbenchError(ValueError):
    """User-facing error: ``str(err)`` is one line naming what is wrong and what is valid."""
