"""The SIGTERM stop agreement between processes (``train.termination``), run on threads that
stand in for processes: a fake coordination key-value store, and "devices" whose step n
finishes once every process has queued it. Each simulated process does what the step loop
does: queue step n, read step n - 1's result, read step n's on log steps, check for a stop.

The end-to-end runs (two real processes, SIGTERM to one) are the slow tests of
test_run_safety and test_object_storage; these catch the protocol's races in seconds."""

from __future__ import annotations

import threading
import time

import pytest

from starflow_jax.train.termination import MARGIN, STOP_KEY, Termination


class FakeKV:
    """The coordination service's key-value calls the agreement uses."""

    def __init__(self):
        self.data, self.cond = {}, threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value
            self.cond.notify_all()

    def key_value_try_get(self, key):
        with self.cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.data[key]

    def blocking_key_value_get(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.data[key]


class Devices:
    """Step n's results are ready once every process has queued step n (its collectives)."""

    def __init__(self, processes):
        self.queued, self.cond = [0] * processes, threading.Condition()

    def queue(self, p, n):
        with self.cond:
            self.queued[p] = n
            self.cond.notify_all()

    def wait(self, n, timeout=10.0):
        with self.cond:
            if not self.cond.wait_for(lambda: min(self.queued) >= n, timeout):
                raise TimeoutError(f"blocked on step {n}'s collective: queued {self.queued}")


def _run(processes, signal_at, delays, log_every=5, steps=60, start=0):
    """Run the simulated processes; ``signal_at[p] = n``: process p gets SIGTERM right after
    its check of step n. Returns each process's stop step (or the exception it raised)."""
    kv, dev = FakeKV(), Devices(processes)
    dev.queued = [start] * processes
    out = [None] * processes

    def proc(p):
        with Termination(grace=600, client=kv) as term:
            term.begin(start)
            try:
                for n in range(start + 1, steps + 1):
                    time.sleep(delays[p])
                    dev.queue(p, n)
                    if n > start + 1:
                        dev.wait(n - 1)  # the skip watch reads the previous step
                    if n % log_every == 0:
                        dev.wait(n)  # a log row reads this step's loss
                    if term.stop_step(n) == n:
                        out[p] = n
                        return
                    if signal_at.get(p) == n:
                        threading.Thread(target=term.request).start()  # the signal's watcher thread
                        time.sleep(0.02)
                out[p] = steps
            except Exception as e:  # noqa: BLE001 - reported to the test
                out[p] = e

    threads = [threading.Thread(target=proc, args=(p,), daemon=True) for p in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a simulated process never finished (deadlock)"
    return out


def test_the_signalled_process_ahead_of_a_slow_peer_does_not_deadlock():
    """CI's hang: process 1, one step ahead, is signalled after its check of step 9 and then
    waits for step 10's loss (a log step); process 0, behind, sees the request at its check
    of step 9. A process that waited there for the other's step would never wake."""
    out = _run(2, signal_at={1: 9}, delays=[0.01, 0.0])
    assert out[0] == out[1], out
    assert 9 < out[0] <= 9 + MARGIN, out


@pytest.mark.parametrize("delays", [[0.0, 0.0], [0.003, 0.0], [0.0, 0.003], [0.002, 0.001, 0.0, 0.004]])
def test_processes_agree_on_one_step_whoever_is_signalled(delays):
    n = len(delays)
    for signalled in range(n):
        out = _run(n, signal_at={signalled: 7 + signalled}, delays=delays, log_every=3, start=4)
        assert len(set(out)) == 1 and isinstance(out[0], int), (signalled, out)
        assert 7 + signalled < out[0] <= 7 + signalled + MARGIN, (signalled, out)


def test_processes_signalled_together_agree_on_the_first_request():
    out = _run(3, signal_at={0: 8, 1: 8, 2: 9}, delays=[0.001, 0.0, 0.002])
    assert len(set(out)) == 1 and isinstance(out[0], int), out


def test_a_stop_step_already_passed_is_an_error_not_a_wrong_checkpoint():
    kv = FakeKV()
    kv.key_value_set(STOP_KEY, "5")
    term = Termination(grace=600, client=kv)
    try:
        with pytest.raises(RuntimeError, match="agreed to stop after step 5, but this process had already done step 7"):
            term.stop_step(7)
    finally:
        term.__exit__(None, None, None)


def test_one_process_stops_at_the_step_it_is_at():
    term = Termination(grace=600)
    term.begin(10)
    assert term.stop_step(11) is None
    term.request()
    try:
        assert term.stop_step(12) == 12
    finally:
        term.__exit__(None, None, None)


def test_the_step_loop_reads_the_previous_steps_result_before_its_check():
    """MARGIN holds because the step loop reads step n - 1's skip count once step n is
    queued (``_SkipWatch.push``), before its stop check of step n: if that read became lazy,
    the processes' hosts could drift apart by more than MARGIN steps."""
    from starflow_jax.train.loop import _SkipWatch

    read = []

    class Count:
        def __init__(self, step):
            self.step = step

        def __int__(self):
            read.append(self.step)
            return 0

    watch = _SkipWatch(limit=5, skipped=0)
    for step in range(1, 5):
        watch.push(step, Count(step))
        assert read == list(range(1, step)), (step, read)
