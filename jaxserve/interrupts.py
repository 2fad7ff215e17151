"""Ctrl-C held back while the engine changes its state, raised once the change is whole.

A step donates the KV cache to the device call and stores the cache it returns; a
KeyboardInterrupt between the two (Python checks for signals after every call) would leave the
runner holding deleted arrays, and one in the scheduler or the output processor would leave
requests half-moved. `deferred_sigint()` around each engine call (jaxserve/llm.py) makes the
call atomic with respect to Ctrl-C: a SIGINT that arrives inside is remembered, and the handler
it would have run (Python's default raises KeyboardInterrupt) runs as the block ends. A step is
milliseconds, so the interrupt comes at most one step late.

Only the main thread receives signals, and only it may set handlers: elsewhere, and when
SIGINT has no Python handler (ignored, or the C default), the block changes nothing.
"""

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_sigint():
    """Runs the block with SIGINT deferred to its end (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL, or a handler not set from Python
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(signal.SIGINT, received[0])
