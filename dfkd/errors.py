"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class DfkdError(Exception):
    """A problem the user can act on: the message says what was wrong, where, and what to do."""


def first_line(e: BaseException, width: int = 200) -> str:
    """The first line of an exception's message, at most `width` characters, or its type's name without one."""
    text = str(e).strip()
    return text.splitlines()[0][:width] if text else type(e).__name__
