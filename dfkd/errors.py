"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class DfkdError(Exception):
    """A problem the user can act on: the message says what was wrong, where, and what to do."""
