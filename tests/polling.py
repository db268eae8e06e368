"""wait_for: the one polling loop the end-to-end tests share (imported as `from polling import wait_for`;
pytest puts tests/ on sys.path for tests/conftest.py)."""

import time


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02) -> None:
    """Return once predicate() is true; an AssertionError naming `what` after `timeout` seconds.

    poll: seconds between calls; raise it for predicates that cost something (`ray job logs` is a CPU-second)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
