"""llfs: the streams a read goes through: frames decoded by the reader and a helper, the prefetcher, the decode pool."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from helpers import need

from d4c.errors import CorruptImage
from d4c.llfs import streams


class FramedBody:
    """A stand-in image for llfs's frame reader: frame i is FRAME bytes of i,
    "decoded" as is, after delay[i] seconds, failing where told."""

    FRAME = 64 << 10
    path = "fake.cdimg"

    def __init__(self, count: int, delay: dict[int, float] | None = None, bad: tuple[int, ...] = (),
                 unreadable_at: int | None = None, extra: bool = False, empty: tuple[int, ...] = ()) -> None:
        import hashlib
        import types
        self.count, self.delay, self.bad = count, delay or {}, bad
        self.unreadable_at, self.extra, self.empty = unreadable_at, extra, empty
        self.body = b"".join(bytes([i]) * self.FRAME for i in range(count) if i not in empty)
        self.stored = types.SimpleNamespace(size=len(self.body), digest=hashlib.sha256(self.body).digest(),
                                            display=lambda: "big")
        self.decoded_by: list[str] = []

    def body_frames(self, stored):  # type: ignore[no-untyped-def]
        for i in range(self.count + self.extra):
            if i == self.unreadable_at:
                raise CorruptImage(self.path, "file is truncated")
            if i == self.count:  # as Image.body_frames: data after the content
                raise CorruptImage(self.path, "data after the last frame")
            yield memoryview(bytes([i]) * self.FRAME), 0 if i in self.empty else self.FRAME

    def decode_frame(self, stored, frame, size):  # type: ignore[no-untyped-def]
        i = frame[0]
        self.decoded_by.append(threading.current_thread().name)
        time.sleep(self.delay.get(i, 0))
        if i in self.bad:
            raise CorruptImage(self.path, f"frame {i} is damaged")
        return b"" if i in self.empty else bytes(frame)


def read_frames(reader, pause: float = 0.0, timeout: float = 20.0,  # type: ignore[no-untyped-def]
                size: int = FramedBody.FRAME) -> tuple[bytes, BaseException | None]:
    """Read a frame reader to its end or first error, on a daemon thread: a hang
    fails the test instead of hanging pytest."""
    out: list[bytes] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            while chunk := reader.read(size):
                out.append(bytes(chunk))
                if pause:
                    time.sleep(pause)
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the reader hangs"
    return b"".join(out), (error[0] if error else None)


@pytest.mark.parametrize("case", ["decode fails", "read fails", "frames past the size"])
def test_frames_fail_while_the_other_hand_decodes(monkeypatch, case) -> None:  # type: ignore[no-untyped-def]
    """A frame fails while the other hand still decodes the one before it: the
    frames before it are served, then the failure, for good; nothing hangs."""
    monkeypatch.setattr(streams, "AHEAD", 4)
    slow = {i: 0.05 for i in range(8)}  # every hand is busy long enough for the other to claim
    image = {"decode fails": FramedBody(8, slow, bad=(3,)),
             "read fails": FramedBody(8, slow, unreadable_at=3),
             "frames past the size": FramedBody(8, slow, extra=True)}[case]
    reader = streams.Frames(image, image.stored, True)  # type: ignore[arg-type]
    got, error = read_frames(reader)
    assert isinstance(error, CorruptImage)
    # frames past the size fail the read of the last frame: no read would ever meet them
    served = 7 if case == "frames past the size" else 3
    assert got == image.body[:served * FramedBody.FRAME]
    with pytest.raises(CorruptImage):
        reader.read(1)
    reader.close()


@pytest.mark.parametrize("verified", [False, True])
def test_frames_helper_leaves_a_slow_reader(monkeypatch, verified) -> None:  # type: ignore[no-untyped-def]
    """A helper leaves a reader that stops reading and is called back when it
    reads on: the body comes out whole and in order, decoded by both hands."""
    monkeypatch.setattr(streams, "HELPER_PATIENCE", 0.002)
    calls: list[int] = []
    help_ = streams.Frames._help
    monkeypatch.setattr(streams.Frames, "_help", lambda self: (calls.append(1), help_(self))[1])
    image = FramedBody(16)
    got, error = read_frames(streams.Frames(image, image.stored, verified), pause=0.02)  # type: ignore[arg-type]
    assert error is None and got == image.body
    assert len(calls) >= 2  # called back after leaving
    assert any(name.startswith("d4c-decode") for name in image.decoded_by)


@pytest.mark.parametrize("verified", [False, True])
def test_frames_past_an_empty_frame(verified) -> None:  # type: ignore[no-untyped-def]
    """An empty frame inside a body (valid, though our writer makes none) is not
    the end of the file: the rest is served, and checked unless verified."""
    image = FramedBody(5, empty=(1, 2))
    got, error = read_frames(streams.Frames(image, image.stored, verified))  # type: ignore[arg-type]
    assert error is None and got == image.body


def test_frames_two_hands_stress() -> None:
    """Random disk and decode delays, damaged frames and early closes around the
    two hands' hand-offs: every body comes out whole, or up to its damaged frame
    and then the error, and no reader hangs."""
    rnd = random.Random(4)

    class Jittery(FramedBody):
        def body_frames(self, stored):  # type: ignore[no-untyped-def]
            for item in super().body_frames(stored):
                time.sleep(rnd.choice((0, 0, 0.0005, 0.002)))
                yield item

        def decode_frame(self, stored, frame, size):  # type: ignore[no-untyped-def]
            time.sleep(rnd.choice((0, 0, 0.0002, 0.001)))
            return super().decode_frame(stored, frame, size)

    for _ in range(500):
        count = rnd.randint(1, 6)
        bad = (rnd.randrange(count),) if rnd.random() < 0.2 else ()
        image = Jittery(count, bad=bad)
        reader = streams.Frames(image, image.stored, rnd.random() < 0.5)  # type: ignore[arg-type]
        if rnd.random() < 0.1 and not bad:  # released after its first read
            assert bytes(reader.read(100)) == image.body[:100]
            reader.close()
            continue
        got, error = read_frames(reader, timeout=10, size=7000)
        assert got == image.body[:(bad[0] if bad else count) * FramedBody.FRAME]
        assert isinstance(error, CorruptImage) == bool(bad)
        reader.close()


def test_frames_closed_while_helping(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A helper waiting for its reader to catch up leaves when the reader is
    closed: the decode pool is free for the next files at once."""
    monkeypatch.setattr(streams, "HELPER_PATIENCE", 30.0)  # only the close may end the wait
    monkeypatch.setattr(streams, "AHEAD", 0)  # a helper decodes one frame, then waits
    for _ in range(streams.DECODERS):  # a waiting helper on every pool thread
        image = FramedBody(4)
        reader = streams.Frames(image, image.stored, True)  # type: ignore[arg-type]
        assert bytes(reader.read(10)) == image.body[:10]
        deadline = time.monotonic() + 10
        while 1 not in reader._decoded and time.monotonic() < deadline:  # the helper has its frame
            time.sleep(0.001)
        assert 1 in reader._decoded
        reader.close()
    streams._pool("decode", streams.DECODERS).submit(lambda: None).result(timeout=5)


class _FakeBody:
    def __init__(self, data: bytes, fail_at: int = -1) -> None:
        self.data, self.pos, self.fail_at, self.closed = data, 0, fail_at, False

    def read(self, n: int) -> bytes:
        if 0 <= self.fail_at <= self.pos:
            raise CorruptImage("fake", "content digest mismatch")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def test_prefetcher() -> None:
    from d4c.llfs.streams import Prefetcher
    data = os.urandom(5 * Prefetcher.CHUNK + 123)
    p = Prefetcher.streaming(_FakeBody(data))
    got, sizes = [], [1, 7, 131072, 3 << 20, 999_999, 1 << 22]
    while True:
        chunk = p.read(sizes[len(got) % len(sizes)])
        if not chunk:
            break
        got.append(chunk)
    p.close()
    assert b"".join(got) == data
    # a failing body: the error reaches the reader
    p = Prefetcher.streaming(_FakeBody(data, fail_at=2 * Prefetcher.CHUNK))
    with pytest.raises(CorruptImage):
        while p.read(1 << 20):
            pass
    with pytest.raises(CorruptImage):  # and every read after it: never a short file
        p.read(1 << 20)
    p.close()
    # closing while the producer waits on a full queue (a put with no timeout) ends it
    body = _FakeBody(data * 4)
    p = Prefetcher.streaming(body)
    for _ in range(500):
        if p._queue.full():
            break
        time.sleep(0.01)
    assert p._queue.full()
    closing = threading.Thread(target=p.close, daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive() and body.closed


def test_frame_memory_is_kept() -> None:
    """The FUSE server asks glibc (this machine's libc) for shared arenas that keep
    freed frames, so first-frame decodes do not fault in fresh pages."""
    from d4c.llfs.threads import keep_frame_memory, keep_large_blocks
    assert keep_frame_memory() and keep_large_blocks()  # as a mount server does once FUSE serves
    # touched once (zero-filled: bytes(n) may get calloc pages never touched), freed ...
    buffers = [bytearray(1 << 20) for _ in range(4)]
    del buffers
    import resource
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    again = [bytearray(1 << 20) for _ in range(4)]  # ... and reused without page faults
    assert resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before < 256 and len(again) == 4


def test_helper_wakes_on_another_cpu() -> None:
    """A helper the reader calls before it decodes a frame itself starts on
    another CPU and may run anywhere afterwards.  Linux's own choice (the busy
    caller's CPU, in the FUSE server) is forced here by pinning the sleeping
    pool threads to the caller's CPU: a plain submit runs them there."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: the helper is to run on another one")
    from d4c.llfs.threads import WakePool, current_cpu
    pool = WakePool("test-wake", 2)
    allowed = os.sched_getaffinity(0)
    both = threading.Barrier(3)
    started = [pool.submit(both.wait, 5) for _ in range(2)]
    both.wait(5)  # both threads exist, and sleep once these return
    for future in started:
        future.result(timeout=5)
    busy_tid: list[int] = []

    def start(submit) -> tuple[int, int, set[int]]:  # type: ignore[no-untyped-def]
        mine = current_cpu()
        os.sched_setaffinity(0, {mine})
        try:
            for tid in pool._threads - set(busy_tid):
                os.sched_setaffinity(tid, {mine})
            seen: list[tuple[int, set[int]]] = []
            future = submit(lambda: seen.append((current_cpu(), os.sched_getaffinity(0))))
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                pass  # the caller keeps its CPU busy
            future.result(timeout=5)
            return mine, *seen[0]
        finally:
            os.sched_setaffinity(0, allowed)

    mine, ran_on, may_run_on = start(pool.submit)
    assert ran_on == mine  # the pinning stands in for the scheduler's choice
    for _ in range(5):
        mine, ran_on, may_run_on = start(pool.submit_elsewhere)
        assert ran_on != mine and may_run_on == allowed
    release = threading.Event()
    busy = pool.submit_elsewhere(lambda: (busy_tid.append(threading.get_native_id()), release.wait(5)))
    while not busy_tid:
        time.sleep(0.001)
    try:  # a busy thread keeps running anywhere while the idle one is woken away
        mine, ran_on, may_run_on = start(pool.submit_elsewhere)
        assert ran_on != mine and os.sched_getaffinity(busy_tid[0]) == allowed
    finally:
        release.set()
    busy.result(timeout=5)
    assert pool.submit_elsewhere(lambda x: x * 2, 21).result(timeout=5) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit_elsewhere(lambda: 1 // 0).result(timeout=5)


def test_fuse_workers_share_one_cpu_and_their_helpers_run_anywhere() -> None:
    """What a mount server's main thread pins before llfuse starts its workers is
    inherited by them: one CPU, chosen by the process id; the threads they start
    for decoding (the decode pool, a streaming body's producer) run anywhere."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: pinning to one of them is what is tested")
    from d4c.llfs.threads import ALL_CPUS, WakePool, pin_fuse_workers
    seen: dict[str, set[int]] = {}

    def main_thread() -> None:  # stands in for serve(): pins, then llfuse starts a worker
        assert pin_fuse_workers() == sorted(ALL_CPUS)[os.getpid() % len(ALL_CPUS)]
        worker = threading.Thread(target=fuse_worker)
        worker.start()
        worker.join()

    def fuse_worker() -> None:
        seen["worker"] = os.sched_getaffinity(0)
        seen["pool"] = WakePool("test-pin", 1).submit(os.sched_getaffinity, 0).result(timeout=5)

        def chunks():  # type: ignore[no-untyped-def]
            seen["producer"] = os.sched_getaffinity(0)
            yield b"body"
        producer = streams.Prefetcher(chunks(), lambda: None)
        assert bytes(producer.read(10)) == b"body"
        producer.close()

    thread = threading.Thread(target=main_thread)
    thread.start()
    thread.join()
    assert seen["worker"] == {sorted(ALL_CPUS)[os.getpid() % len(ALL_CPUS)]}
    assert seen["pool"] == seen["producer"] == set(ALL_CPUS) == os.sched_getaffinity(0)
