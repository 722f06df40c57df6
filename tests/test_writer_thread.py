"""WriterThread: chunks written in order on another thread, errors surfaced, the file always finished."""

import threading

import pytest
import torch

from rf_core.io.writer_thread import WriterThread


class Inner:
    def __init__(self, fail_at=None, gate=None) -> None:
        self.chunks, self.closed, self.threads = [], False, set()
        self.fail_at, self.gate = fail_at, gate

    def write(self, frames):
        self.threads.add(threading.get_ident())
        if self.gate is not None:
            self.gate.wait()
        if len(self.chunks) == self.fail_at:
            raise OSError("disk full")
        self.chunks.append(frames)

    def close(self):
        self.closed = True


def test_chunks_are_written_in_order_off_the_callers_thread():
    inner = Inner()
    w = WriterThread(inner, max_chunks=2)
    sent = [torch.full((2, 4, 4, 3), i, dtype=torch.uint8) for i in range(6)]
    for chunk in sent:
        w.write(chunk)
    w.close()
    assert inner.closed and inner.threads and threading.get_ident() not in inner.threads
    assert len(inner.chunks) == 6 and all(torch.equal(a, b) for a, b in zip(inner.chunks, sent))


def test_a_full_queue_makes_write_wait_instead_of_growing():
    gate = threading.Event()
    inner = Inner(gate=gate)
    w = WriterThread(inner, max_chunks=1)
    w.write(torch.zeros(1))  # taken by the thread, which waits at the gate
    w.write(torch.zeros(1))  # fills the queue
    blocked = threading.Thread(target=w.write, args=(torch.zeros(1),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the third chunk waits for room
    gate.set()
    blocked.join(5)
    w.close()
    assert len(inner.chunks) == 3


def test_an_error_is_raised_to_the_caller_and_the_file_is_still_closed():
    inner = Inner(fail_at=1)
    w = WriterThread(inner)
    w.write(torch.zeros(1))
    w.write(torch.zeros(1))
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert inner.closed and len(inner.chunks) == 1
    with pytest.raises(ValueError, match="closed"):
        w.write(torch.zeros(1))
