"""SIGTERM during training (a preempted or maintained VM, a launcher stopping its
processes): every process finishes its step, all of them stop after one agreed step with a
checkpoint, and a process that is still alive ``grace`` seconds after its signal (blocked in
a collective whose peer is gone) exits hard, instead of waiting for the distributed
runtime's heartbeat timeout.

Agreement (several processes): the first process to get the signal writes a stop step into
the coordination service's key-value store (first writer wins, so processes signalled
together agree too): the number of step checks it has made plus ``MARGIN``. Every process
looks for that key after each step (one local RPC, ~0.2 ms) without ever waiting for
another process, and stops once it has done that step. Waiting would deadlock: a process
that parks in the key-value store at step n while a peer, one step ahead, waits in a
collective of step n + 1 for it, never wakes (CI caught two processes doing this).

Why ``MARGIN`` = 3 steps suffices: the step loop reads step n - 1's results after queueing
step n and before its check of step n (``_SkipWatch``), so a process checking step c has
seen step c - 1 finish on every device, and so every process had queued step c - 1, i.e.
checked step c - 2. When the key is written (under the lock that orders it after the
writer's own checks) with the writer at check w, every process has issued checks up to at
most w + 2; its next check, issued after the write, is at most w + 3 and sees the key.

Python runs signal handlers only when the main thread runs Python code, which a thread
blocked in a collective does not; the handler is therefore also watched through the
signal wake-up descriptor by a thread of its own, which writes the key and starts the
grace timer."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

GRACE_ENV = "STARFLOW_SIGTERM_GRACE_S"
EXIT_CODE = 128 + signal.SIGTERM
STOP_KEY = "starflow/sigterm/request"
MARGIN = 3


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

    def __init__(self, grace: float | None = None, client=None):
        """``client``: the coordination service's key-value client of a multi-process run
        (``distributed_client()``), through which the processes agree on the stop step."""
        self.grace = grace_seconds() if grace is None else grace
        self.requested = False
        self.client = client
        self.agreed: int | None = None
        self.checked = 0  # the last step this process looked for the stop key after
        self._lock = threading.RLock()  # re-entrant: the signal handler may run inside stop_step
        self._installed = False
        self._timer: threading.Timer | None = None

    def begin(self, step: int) -> None:
        """The step the loop starts after (a resumed run's restored step)."""
        with self._lock:
            self.checked = step

    def stop_step(self, done: int) -> int | None:
        """Called by every process after each step (``done`` steps finished): the step at
        which all processes stop, once a stop was requested (None before). Never waits for
        another process."""
        if self.agreed is not None:
            return self._checked_against(done)
        if self.client is None:
            if self.requested:
                self.agreed = done
            return self.agreed
        with self._lock:
            self.checked = done
        try:
            value = self.client.key_value_try_get(STOP_KEY)
        except Exception:  # noqa: BLE001 - NOT_FOUND: nobody asked to stop
            return None
        self.agreed = int(value)
        self.request()  # another process's signal: this one stops too, within the same grace
        return self._checked_against(done)

    def _checked_against(self, done: int) -> int:
        if done > self.agreed:
            raise RuntimeError(
                f"SIGTERM: the processes agreed to stop after step {self.agreed}, but this process had already "
                f"done step {done}; stopping without a checkpoint"
            )
        return self.agreed

    def request(self) -> None:
        """What SIGTERM does: ask every process to stop (once), and start the grace timer."""
        with self._lock:
            if self.requested:
                return
            self.requested = True
            if self.client is not None:
                try:  # first writer wins: a process signalled at the same time reads this one's step
                    self.client.key_value_set(STOP_KEY, str(self.checked + MARGIN), allow_overwrite=False)
                except Exception:  # noqa: BLE001 - already written by another process, or the coordinator is gone
                    pass
        when = "at the next step" if self.client is None else f"within {MARGIN} steps, as every process"
        print(
            f"starflow-jax: SIGTERM: stopping {when} (exiting in {self.grace:.0f} s at the latest)",
            file=sys.stderr,
            flush=True,
        )
        self._timer = threading.Timer(self.grace, self._expire)
        self._timer.daemon = True
        self._timer.start()

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
        self.request()

    def _watch(self) -> None:
        while True:
            try:
                data = self._r.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self.request()

    def _expire(self) -> None:
        print(
            f"starflow-jax: still running {self.grace:.0f} s after SIGTERM (blocked, e.g. on a process that is "
            f"gone); exiting now",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._installed:
            return
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
