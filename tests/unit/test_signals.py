"""SIGTERM/SIGINT reach the stop event whatever the main thread is doing when they land."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# The main thread holds the event's own lock (as it does inside ``stop.wait()``) when the signal lands; the
# handler runs right there, on the main thread. A handler that set the event itself would wait for that lock
# forever. The loop after os.kill gives the interpreter bytecode to run the handler in.
SCRIPT = """
import logging, os, signal, sys
from asyndgan.rpc import stop_event_on_signals

logging.basicConfig(level=logging.INFO)

stop = stop_event_on_signals()
with stop._cond:
    os.kill(os.getpid(), signal.SIG{name})
    for _ in range(100_000):
        pass
sys.exit(0 if stop.wait(10) else 3)
"""


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_a_signal_that_lands_while_the_event_lock_is_held_still_stops(name: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(name=name)], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIG{name} deadlocked the signal handler")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert f"signal {getattr(signal, 'SIG' + name).value}: shutting down" in done.stderr.decode()
