"""Bounded polling: the one way cluster tests wait for something (never a bare sleep).

`wait_for` polls a predicate until it returns a truthy value or the deadline passes. Exceptions raised by the
predicate count as "not yet" (a resource that does not exist yet makes `kubectl get` fail), and the last one
is quoted in the timeout error so that a wait which never succeeds says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The condition did not hold before the deadline."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.2,
    message: str = "condition",
) -> T:
    """Return the first truthy result of `predicate()`, polling every `interval` s for at most `timeout` s."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # not-yet: e.g. NotFound while a controller is still working
            last_error = exc
        else:
            if value:
                return value
            last_value = value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = (
                f"last error: {last_error!r}" if last_error is not None else f"last value: {last_value!r}"
            )
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {message} ({detail})")
        time.sleep(min(interval, remaining))
