"""The signals that ask dfkd to stop, and a handler for them while a block of work runs."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

#: Ctrl-C, `kill`/`docker stop`/a scheduler's limit/torchrun's agent, and a closed terminal or dropped SSH session
#: (SIGHUP, where the system has it).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

#: The last stop signal a handler of `on_stop_signals` took in this process (None: none yet).
_last_signal: list[int | None] = [None]


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None], signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """`handler` answers `signals` inside the block; the previous handlers are back after it.

    Off the main thread (where Python allows no handler) the block runs with the handlers as they are. A signal
    already ignored stays ignored: `nohup` ignores SIGHUP, and work started so must outlive its terminal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def taken(signum: int, frame: Any) -> None:
        _last_signal[0] = signum
        handler(signum, frame)

    old = {s: signal.signal(s, taken) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_exit_code() -> int:
    """The exit status of a process a stop signal ended: 128 + that signal, as the shell reports a killed process.

    A run that stops gracefully on SIGTERM exits 143 like every other command so stopped; a stop this process took
    no signal for (another torchrun rank's, agreed) or a Ctrl-C exits 130.
    """
    return 128 + (_last_signal[0] or signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """A SIGTERM or SIGHUP turned into the interrupt Ctrl-C raises.

    The work's cleanup runs (a partial temporary file, a lock), where the signal's default action ended the process
    on the spot.
    """

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` inside the block; SIGINT keeps Python's KeyboardInterrupt.

    Commands with a stop of their own (distill, extend) install their handlers within it.
    """
    _last_signal[0] = None  # a command's exit status tells its own stop (tests run many commands in one process)
    with on_stop_signals(_terminate, [s for s in STOP_SIGNALS if s != signal.SIGINT]):
        yield
