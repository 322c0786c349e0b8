"""SIGTERM and SIGINT as a stop the waiting code looks at, never as an exception or a lock taken in a handler.

A Python signal handler runs in the main thread between two bytecodes of whatever it was doing. Two ways of
acting there failed here:

- raising from the handler: the exception lands wherever the main thread happened to be. CI (stop 51) sent
  SIGTERM to a gateway waiting for its database just as it logged "does not answer yet"; the exception was
  raised inside ``logging.StreamHandler.emit``, which swallows every exception (``--- Logging error ---``),
  and the gateway waited the whole ``CTSCREEN_DB_START_WAIT_S`` on.
- setting a :class:`threading.Event` in the handler: the main thread may hold that event's lock (leaving
  ``Event.wait(0.5)``), and ``Event.set`` waited for it forever (``make demo`` stopped by ``timeout`` hung).

So the handler only notes the signal (a list append takes no Python lock) and sets the event from a thread
of its own; the code that waits polls the event.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOPPING = (signal.SIGTERM, signal.SIGINT)


def set_from_signal(event: threading.Event) -> None:
    """Set ``event`` from a signal handler: from a thread of its own (see the module's note)."""
    threading.Thread(target=event.set, name="ctscreen-stop", daemon=True).start()


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[signal.Signals]]:
    """While the block runs, SIGTERM and SIGINT set ``stop`` (soon after, from a thread); the block gets the
    list of the signals received, oldest first. Only in the main thread (signals are handled there; elsewhere
    nothing is installed and the list stays empty); the handlers there before are put back after.

    >>> import os
    >>> stop = threading.Event()
    >>> with stop_on_signals(stop) as received:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     stop.wait(5), [s.name for s in received]
    (True, ['SIGTERM'])
    """
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum))
        set_from_signal(stop)

    before = {sig: signal.signal(sig, on_signal) for sig in STOPPING}
    try:
        yield received
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
