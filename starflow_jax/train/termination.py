"""SIGTERM during training (a preempted VM, a launcher stopping its processes): the loop
stops at the next step boundary, and a process that is still alive ``grace`` seconds
later (blocked in a collective whose peer is gone) exits hard, instead of waiting for
the distributed runtime's heartbeat timeout.

Python runs signal handlers only when the main thread runs Python code, which a thread
blocked in a collective does not; the handler is therefore also watched through the
signal wake-up descriptor by a thread of its own, which starts the grace timer."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

GRACE_ENV = "STARFLOW_SIGTERM_GRACE_S"
EXIT_CODE = 128 + signal.SIGTERM


def grace_seconds() -> float:
    text = os.environ.get(GRACE_ENV, "10")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{GRACE_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{GRACE_ENV} must be > 0, got {value}")
    return value


class Termination:
    """``with Termination() as term:`` ... ``if term.requested: ...``. Outside the main
    thread (where signals cannot be handled) it does nothing."""

    def __init__(self, grace: float | None = None):
        self.grace = grace_seconds() if grace is None else grace
        self.requested = False
        self._installed = False
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "Termination":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._installed = True
        threading.Thread(target=self._watch, name="starflow-sigterm", daemon=True).start()
        return self

    def _on_signal(self, signum, frame) -> None:
        self._start()

    def _watch(self) -> None:
        while True:
            try:
                data = self._r.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self._start()

    def _start(self) -> None:
        if self.requested:
            return
        self.requested = True
        print(f"starflow-jax: SIGTERM: stopping at the next step (exiting in {self.grace:.0f} s at the latest)",
              file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.grace, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        print(f"starflow-jax: still running {self.grace:.0f} s after SIGTERM (blocked, e.g. on a process that is "
              f"gone); exiting now", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        if self._timer is not None:
            self._timer.cancel()
        signal.set_wakeup_fd(self._old_fd)
        # a handler installed outside Python (JAX's preemption notifier) cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old_handler is None else self._old_handler)
        self._w.close()
        self._r.close()
        self._installed = False
