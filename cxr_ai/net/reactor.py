"""A pause-safe checkpoint for pynetdicom's association reactor.

pynetdicom's association loop sets ``_is_paused``, waits on ``_reactor_checkpoint``, clears
``_is_paused`` and then takes the next complete DIMSE message off the queue. A thread that
sends a request on the association (``send_c_store``, ``send_c_echo``, ...) first pauses the
loop: it clears the checkpoint and waits until ``_is_paused`` is set, sends, and takes the
answer off the same queue. When the loop has just passed the checkpoint but not yet cleared
``_is_paused``, the sender sees the loop as paused while it is about to look at the queue:
an answer that comes fast enough is taken by the loop and thrown away, and the sender waits
out its DIMSE timeout (pynetdicom issues #435 and #842: several sending threads in one
process, and a fast peer, make it likely; cxr-ai's listener answers within about a
millisecond of the data set's end).

:class:`PauseSafeCheckpoint` closes that window: before the loop goes on, it clears
``_is_paused`` itself and then looks at the checkpoint again; cleared meanwhile, it marks
itself paused and waits. A sender that saw ``_is_paused`` set can thus rely on the loop not
touching the queue until the checkpoint is set again. :func:`handle_conn_open_pause_safe`
installs it on each association cxr-ai requests (bound to ``EVT_CONN_OPEN``, before the
loop starts); the listener's associations get it as :class:`cxr_ai.net.receive.ReactorGate`.
"""

from __future__ import annotations

import threading


class PauseSafeCheckpoint(threading.Event):
    """An association's ``_reactor_checkpoint`` that never lets a paused loop go on."""

    def __init__(self, assoc) -> None:
        super().__init__()
        self._assoc = assoc
        super().set()

    def _idle(self) -> None:
        """Called in the loop's thread once the checkpoint is open; subclasses wait for work."""

    def wait(self, timeout: float | None = None) -> bool:
        assoc = self._assoc
        while True:
            if not super().wait(timeout):
                return False
            if threading.current_thread() is not assoc:
                return True
            self._idle()
            assoc._is_paused = False
            if self.is_set():
                return True
            assoc._is_paused = True        # paused while the loop was not looking: wait


def install(assoc) -> bool:
    """Give ``assoc`` a :class:`PauseSafeCheckpoint`; before its loop starts, only.

    False (and nothing changed) where this pynetdicom has no checkpoint to replace.
    """
    current = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(current, threading.Event) or not hasattr(assoc, "_is_paused"):
        return False
    if not isinstance(current, PauseSafeCheckpoint):
        checkpoint = PauseSafeCheckpoint(assoc)
        if not current.is_set():
            checkpoint.clear()
        assoc._reactor_checkpoint = checkpoint
    return True


def handle_conn_open_pause_safe(event) -> None:
    """``EVT_CONN_OPEN`` handler for associations we request: see :func:`install`."""
    if event.assoc.is_requestor:
        install(event.assoc)
