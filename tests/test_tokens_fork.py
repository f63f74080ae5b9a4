"""A process forked while another thread loads a tokenizer (the exporter's thread warms them at its start) can
still count tokens: the loader's lock is not inherited held."""

from __future__ import annotations

import os
import threading

import pytest

from costobs_callbacks import _tokens


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_loader_lock_is_held_counts_tokens() -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _tokens._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own lock, free
            os.close(r)
            ok = _tokens._lock.acquire(timeout=5)
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert got == b"1"
