"""The pause-safe reactor checkpoint (cxr_ai.net.reactor) on the requests cxr-ai makes."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from helpers_net import serving
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai.net import reactor
from cxr_ai.net.scu import SCU_HANDLERS


class Loop(threading.Thread):
    """pynetdicom's association loop, one turn: mark paused, wait at the checkpoint, mark
    running, take the next message off the queue (what it takes is lost to a sender)."""

    def __init__(self, checkpoint_class) -> None:
        super().__init__(daemon=True)
        self._is_paused = False
        self.messages: queue.Queue = queue.Queue()
        self.checkpoint = checkpoint_class(self)
        self.taken: list = []

    def run(self) -> None:
        self._is_paused = True
        self.checkpoint.wait()
        self._is_paused = False
        try:
            self.taken.append(self.messages.get_nowait())
        except queue.Empty:
            pass


def test_a_sender_that_saw_the_loop_paused_gets_its_answer() -> None:
    """The loop passed the checkpoint, then a sender paused it and its answer came at once:
    the loop must not take the answer."""
    passed, go_on = threading.Event(), threading.Event()

    class HeldAfterTheCheckpoint(reactor.PauseSafeCheckpoint):
        def _idle(self) -> None:          # the loop's thread, past the open checkpoint
            passed.set()
            go_on.wait(10)

    loop = Loop(HeldAfterTheCheckpoint)
    loop.start()
    assert passed.wait(10)
    # the sender (pynetdicom's send_c_*): pause, wait for _is_paused, send, take the answer
    loop.checkpoint.clear()
    assert loop._is_paused
    loop.messages.put("C-STORE-RSP")
    go_on.set()
    loop.join(0.5)
    assert loop.is_alive() and loop._is_paused          # paused, waiting at the checkpoint
    assert loop.messages.get_nowait() == "C-STORE-RSP"  # the sender's answer is there
    loop.checkpoint.set()                               # the sender is done
    loop.join(10)
    assert loop.taken == []


def test_install_keeps_a_paused_state_and_skips_what_it_cannot_replace() -> None:
    class Assoc:
        _is_paused = False
        _reactor_checkpoint = threading.Event()

    a = Assoc()
    assert reactor.install(a) and isinstance(a._reactor_checkpoint, reactor.PauseSafeCheckpoint)
    assert not a._reactor_checkpoint.is_set()           # it was cleared: stays cleared
    first = a._reactor_checkpoint
    assert reactor.install(a) and a._reactor_checkpoint is first
    assert not reactor.install(object())


def test_cxr_ai_requests_get_it_before_their_loop_starts(tmp_path: Path) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    with serving(tmp_path) as scp:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXR_AI", evt_handlers=SCU_HANDLERS)
        try:
            assert assoc.is_established
            assert isinstance(assoc._reactor_checkpoint, reactor.PauseSafeCheckpoint)
            for _ in range(20):
                assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert assoc.is_released
