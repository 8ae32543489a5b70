"""Socket I/O of the network protocol nodes (vdiskfs.drivers.protocol._streams): what need not
wait does not yield to trio's scheduler, and what must wait still completes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vdiskfs.drivers.protocol import _streams
from vdiskfs.drivers.protocol._streams import StreamIO, acquire


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_a_free_token_is_taken_without_a_checkpoint() -> None:
    lock, slots = trio.Lock(), trio.Semaphore(1)
    with trio.testing.assert_no_checkpoints():
        await acquire(lock)
        await acquire(slots)
    lock.release()
    slots.release()


async def test_a_taken_token_is_waited_for() -> None:
    slots = trio.Semaphore(1)
    await acquire(slots)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acquire, slots)
        await trio.testing.wait_all_tasks_blocked()
        assert slots.value == 0 and slots.statistics().tasks_waiting == 1
        slots.release()
    assert slots.value == 0


async def test_bytes_at_hand_move_without_a_checkpoint() -> None:
    left, right = await _pair()
    sender, receiver = StreamIO(left), StreamIO(right)
    with trio.testing.assert_no_checkpoints():
        assert sender.try_send([b"head", memoryview(b"er")]) == 6
        view = memoryview(bytearray(16))
        assert await receiver.receive_into(view) == 6
    assert bytes(view[:6]) == b"header"
    with trio.testing.assert_no_checkpoints():
        await sender.send_all([b"again"])
        assert await receiver.receive_into(view) == 5
    assert bytes(view[:5]) == b"again"


async def test_a_send_the_kernel_cannot_take_at_once_completes() -> None:
    left, right = await _pair()
    sender, receiver = StreamIO(left), StreamIO(right)
    data = bytes(range(256)) * (8 << 12)  # 8 MiB: far more than a socket buffer holds
    got = memoryview(bytearray(len(data)))

    async def receive() -> None:
        await receiver.receive_exactly_into(got)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        parts = [data[:5], memoryview(data)[5:]]
        sent = sender.try_send(parts)
        assert 0 < sent < len(data)
        await sender.send_rest(parts, sent)
    assert got == data


async def test_a_long_run_of_data_yields_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that keep coming never make the receiver wait, so it yields every YIELD_EVERY
    bytes on its own (here made small: a socket holds far less than the real 4 MiB)."""
    monkeypatch.setattr(_streams, "YIELD_EVERY", 1024)
    left, right = await _pair()
    receiver = StreamIO(right)
    await left.send_all(b"x" * 4096)
    with trio.testing.assert_no_checkpoints():
        assert await receiver.receive_into(memoryview(bytearray(512))) == 512
    with trio.testing.assert_checkpoints():
        assert await receiver.receive_into(memoryview(bytearray(1024))) == 1024


async def test_the_end_of_the_stream_is_zero_then_an_error() -> None:
    left, right = await _pair()
    receiver = StreamIO(right)
    await left.aclose()
    assert await receiver.receive_into(memoryview(bytearray(4))) == 0
    try:
        await receiver.receive_exactly_into(memoryview(bytearray(4)))
    except trio.BrokenResourceError:
        pass
    else:
        raise AssertionError("no error at the end of the stream")
