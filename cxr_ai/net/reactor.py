"""How an association's two pynetdicom loops wait: a pause-safe checkpoint for the
association's reactor, and waiting for work instead of sleeping.

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
loop starts); the listener's associations get it as :class:`ReactorGate`.

Waiting instead of sleeping: pynetdicom's two threads per association (the connection's
DUL loop and the association's reactor) sleep 1 ms whenever a loop found nothing to do. On
the listener's fast receive path (:mod:`cxr_ai.net.receive`, which installs these) they wait
for work instead: the DUL thread in ``select`` (:func:`wait_transport_event`), which
:class:`Waker` ends when something is queued for it; the reactor at its checkpoint
(:class:`ReactorGate`); :func:`waking_copy` makes a queue whose every put wakes its consumer.
"""

from __future__ import annotations

import queue
import select
import socket
import threading

from pynetdicom.dul import DULServiceProvider

#: Longest an idle connection's upper-layer thread waits before checking its timers again.
IDLE_WAIT_SECONDS = 0.01


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


class Waker:
    """Wakes a connection's upper-layer thread when there is something to send or to stop."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:          # full (a wake-up is pending anyway) or closed
            pass

    def wait(self, sock: socket.socket, timeout: float) -> None:
        """Block until ``sock`` is readable, :meth:`wake` was called, or ``timeout`` passed."""
        try:
            readable, _, _ = select.select([sock, self._r], [], [], timeout)
        except (OSError, ValueError):    # closed under us: the reactor's own checks report it
            return
        if self._r in readable:
            try:
                while self._r.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class WakingQueue(queue.Queue):
    """A queue whose every put calls ``wake`` (the consumer's thread then stops waiting)."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def waking_copy(q: queue.Queue, wake) -> WakingQueue:
    """A :class:`WakingQueue` holding what ``q`` holds (nothing, before the threads start)."""
    waking = WakingQueue(wake)
    while True:
        try:
            waking.put(q.get_nowait())
        except queue.Empty:
            return waking


class ReactorGate(PauseSafeCheckpoint):
    """The association's reactor checkpoint, which also waits for the reactor's work.

    pynetdicom's association loop sleeps 1 ms, waits on this checkpoint (cleared while
    another thread pauses the reactor to do its own messaging), then looks for a complete
    DIMSE message, a release request, an abort, a dead DUL thread and its network timeout.
    Idle, that is a thousand wake-ups a second, and a message waits up to 1 ms for the next
    one. Here, once the checkpoint is open, the reactor's own thread also waits until there
    is work: :meth:`wake` is called by every put on the DIMSE message queue and the DUL's
    queue of primitives for the user, by :meth:`set` (``kill`` sets it) and when the DUL
    thread ends; ``IDLE_WAIT_SECONDS`` bound the wait for the timer checks. While it waits
    the reactor counts as paused, as in pynetdicom, so other threads may message at once,
    and it goes on only if the checkpoint is still open (:class:`PauseSafeCheckpoint`).
    """

    def __init__(self, assoc) -> None:
        self._work = threading.Event()
        super().__init__(assoc)

    def wake(self) -> None:
        self._work.set()

    def set(self) -> None:
        super().set()
        self._work.set()

    def _idle(self) -> None:
        assoc = self._assoc
        if assoc.dimse.msg_queue.empty() and not assoc._kill:
            self._work.wait(IDLE_WAIT_SECONDS)
        # Consumed only now: work that came since the reactor last looked (a release
        # request queued while it served a message) ends the wait at once; work that
        # comes after this is seen by the loop that follows, or ends the next wait.
        self._work.clear()


_STOCK_TRANSPORT_EVENT = DULServiceProvider._is_transport_event


def wait_transport_event(self: DULServiceProvider) -> bool:
    """:meth:`DULServiceProvider._is_transport_event`, waiting for data when idle.

    Returns as pynetdicom's: True when a PDU was read. With nothing queued for the state
    machine, blocks in ``select`` until the peer sends, a primitive is queued, the DUL is
    killed, or ``IDLE_WAIT_SECONDS`` pass.
    """
    sock = self.socket
    if sock is None or self.state_machine.current_state == "Sta13":
        return _STOCK_TRANSPORT_EVENT(self)
    if not self._cxr_connection.buffered and not sock.ready:
        if self._kill_thread or sock.socket is None or not self.event_queue.empty() \
                or not self.to_provider_queue.empty():
            return False
        self._cxr_waker.wait(sock.socket, IDLE_WAIT_SECONDS)
        if not sock.ready:
            return False
    self._read_pdu_data()
    return True
