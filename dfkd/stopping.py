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


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None], signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """`handler` answers `signals` inside the block; the previous handlers are back after it.

    Off the main thread (where Python allows no handler) the block runs with the handlers as they are. A signal
    already ignored stays ignored: `nohup` ignores SIGHUP, and work started so must outlive its terminal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
    with on_stop_signals(_terminate, [s for s in STOP_SIGNALS if s != signal.SIGINT]):
        yield
