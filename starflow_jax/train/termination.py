"""SIGTERM during training (a preempted or maintained VM, a launcher stopping its
processes): every process finishes its step, all of them agree on one step at which to
save a checkpoint and stop, and a process that is still alive ``grace`` seconds after its
signal (blocked in a collective whose peer is gone) exits hard, instead of waiting for
the distributed runtime's heartbeat timeout.

Agreement (several processes): a process that gets the signal publishes a stop request
in the coordination service's key-value store; each process checks for it after every
step (one local RPC, ~0.2 ms) and, once it sees it, publishes the step it has reached and
waits for every other process's; all stop at the largest. No process has run past its
published step while waiting, so each reaches the agreed step, and they save together.

Python runs signal handlers only when the main thread runs Python code, which a thread
blocked in a collective does not; the handler is therefore also watched through the
signal wake-up descriptor by a thread of its own, which publishes the request and starts
the grace timer."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

GRACE_ENV = "STARFLOW_SIGTERM_GRACE_S"
EXIT_CODE = 128 + signal.SIGTERM
STOP_KEY = "starflow/sigterm/request"
AT_KEY = "starflow/sigterm/at"


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

    def __init__(self, grace: float | None = None, client=None, process: int = 0, processes: int = 1):
        """``client``: the coordination service's key-value client of a multi-process run
        (``distributed_client()``), through which the processes agree on the stop step."""
        self.grace = grace_seconds() if grace is None else grace
        self.requested = False
        self.client, self.process, self.processes = client, process, processes
        self.agreed: int | None = None
        self._installed = False
        self._timer: threading.Timer | None = None

    def stop_step(self, done: int) -> int | None:
        """Called by every process after each step (``done`` steps finished): the step at
        which all processes stop, once a stop was requested (None before)."""
        if self.agreed is not None:
            return self.agreed
        if self.client is None:
            if self.requested:
                self.agreed = done
            return self.agreed
        if not self.requested:
            try:
                self.client.key_value_try_get(STOP_KEY)
            except Exception:  # noqa: BLE001 - NOT_FOUND: nobody asked to stop
                return None
            self._start()  # another process's signal: this one stops too, within the same grace
        self.client.key_value_set(f"{AT_KEY}/{self.process}", str(done), allow_overwrite=True)
        try:
            at = [
                int(self.client.blocking_key_value_get(f"{AT_KEY}/{q}", int(self.grace * 1000)))
                for q in range(self.processes)
            ]
        except Exception as e:  # noqa: BLE001 - a process never answered (gone, or finished)
            raise RuntimeError(
                f"SIGTERM: the processes could not agree on a step to stop at within {self.grace:.0f} s "
                f"({str(e).splitlines()[0][:120]}); stopping without a checkpoint"
            ) from None
        self.agreed = max(at)
        return self.agreed

    def __enter__(self) -> Termination:
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
        if self.client is not None:
            try:
                self.client.key_value_set(STOP_KEY, str(self.process), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator is gone: the grace timer still ends this process
                pass
        print(
            f"starflow-jax: SIGTERM: stopping at the next step (exiting in {self.grace:.0f} s at the latest)",
            file=sys.stderr,
            flush=True,
        )
        self._timer = threading.Timer(self.grace, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        print(
            f"starflow-jax: still running {self.grace:.0f} s after SIGTERM (blocked, e.g. on a process that is "
            f"gone); exiting now",
            file=sys.stderr,
            flush=True,
        )
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


def distributed_client():
    """The coordination service's key-value client of this multi-process run (None with
    one process, or where this JAX does not expose it)."""
    import jax

    if jax.process_count() == 1:
        return None
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None
