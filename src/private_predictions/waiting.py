"""Bounded, interruptible waits.

A TensorFlow call that waits on a server (a dequeue, or any call to a host that went
silent) holds the calling thread inside C++, where neither a deadline nor Jupyter's
"Interrupt the kernel" can reach it. So such calls run in a background thread of
their own, and the caller waits for them here, in short slices: a KeyboardInterrupt,
a deadline or a watch (is every server still there? is anybody serving?) ends the
wait within a fraction of a second, and the caller then cancels the call (closing the
queue a dequeue waits on makes it fail at once) or abandons it.
"""
import threading
import time
from typing import Any, Callable, Iterable, Optional

SLICE = 0.1  # how long a wait sleeps between looks at its deadline: the interrupt latency
WATCH_INTERVAL = 0.5
CLEAN_UP_SECONDS = 5.0  # how long a finished call's thread may take to end (see BackgroundCall.end)


class BackgroundCall:
    """``function(*args)`` running in a daemon thread, so that nothing waits on it unbounded."""

    def __init__(self, function: Callable, *args, name: str = "private-predictions call"):
        self._done = threading.Event()
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(function, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, function, args) -> None:
        try:
            self._result = function(*args)
        except BaseException as error:  # handed to whoever waits for the result
            self._error = error
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; a KeyboardInterrupt gets through (Event.wait is interruptible)."""
        return self._done.wait(seconds)

    def end(self, seconds: float = CLEAN_UP_SECONDS) -> None:
        """Wait up to ``seconds`` for the call's thread to end, not only the call.

        As the thread ends it deletes what it kept in thread-local storage (TensorFlow keeps
        graphs there). A daemon thread still doing that when Python exits aborts the process
        ("terminate called without an active exception"). Bounded, in case a call or a
        deletion waits on a silent host: such a thread is abandoned.
        """
        self._thread.join(seconds)

    def result(self):
        self.end()  # handed over once the thread has cleaned up, so the caller may exit at once
        if self._error is not None:
            raise self._error
        return self._result


def wait_for(call: BackgroundCall, timeout: Optional[float], message: str = "",
             watches: Iterable[Callable[[], None]] = (), interval: float = WATCH_INTERVAL):
    """Return ``call``'s result once it is done; meanwhile run each watch every ``interval`` s.

    A watch raises to end the wait (a dead server, a serving side gone). After
    ``timeout`` s (None: never) raise TimeoutError(message). ``call`` goes on running in
    its thread whenever this raises: the caller cancels or abandons it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    next_watch = time.monotonic() + interval
    while not call.wait(SLICE):
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise TimeoutError(message)
        if now >= next_watch:
            for watch in watches:
                watch()
            next_watch = time.monotonic() + interval
    return call.result()


def bounded(function: Callable, *args, timeout: float, message: str,
            watches: Iterable[Callable[[], None]] = ()):
    """``function(*args)``, given up after ``timeout`` s: for calls that return at once unless a host is silent."""
    return wait_for(BackgroundCall(function, *args), timeout, message, watches)


def wait_until(condition: Callable[[], Any], timeout: float, message: str, pause: float = SLICE):
    """Check ``condition`` every ``pause`` s and return what it returns once true; raise
    TimeoutError(message) after ``timeout`` s.

    For conditions checked without TensorFlow (a file appears, a port opens).
    """
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(pause)
    return found
