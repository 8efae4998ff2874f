"""A stop signal taken by another library's handler (Prefect's, while a flow runs) still counts as a stop."""

from __future__ import annotations

import os
import signal
import time

from flows import lifetime
from flows.lifetime import interrupt_on_signals


def test_a_signal_another_handler_takes_is_still_recorded(monkeypatch):
    """CI saw SIGTERM land inside Prefect's task engine and surface as "ValueError: Task run is not set" (exit 1):
    the signal reached only Prefect's handler, so the CLI did not know it had been asked to stop (143)."""
    monkeypatch.setattr(lifetime, "_stop_after_grace", lambda signum, grace_s: None)  # the armed timer must not exit pytest
    taken = []
    with interrupt_on_signals((signal.SIGUSR1,), grace_s=60.0) as record:
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: taken.append(signum))  # the library's handler
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while record.signum is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            signal.signal(signal.SIGUSR1, previous)
    assert taken == [signal.SIGUSR1]
    assert record.signum == signal.SIGUSR1 and record.exit_code == 128 + signal.SIGUSR1
