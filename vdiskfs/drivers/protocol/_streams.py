"""Socket I/O for the network protocols: straight on the descriptor, into the caller's buffer.

Two costs are avoided here, both measured on NBD over loopback (2 cores):

- **Copies.** An NBD read reply or an HTTP ``206`` body of a known length goes from the socket
  into the buffer the request returns: 1 MiB reads of a qemu-nbd export ran at 240 MiB/s
  through ``receive_some`` and two copies, 620 MiB/s (710 with 8 readers) this way.
- **Scheduler passes.** trio's socket calls end with a checkpoint even when the kernel took or
  gave the bytes at once, and a pass of trio's run loop (an ``epoll_wait`` and the task
  switches) cost more than the ``send`` itself: a 4 KiB NBD read at queue depth 1 took about
  five passes. :class:`StreamIO` calls ``readv``/``writev`` on the socket's descriptor (which
  trio made non-blocking) and waits for the descriptor only when the kernel says ``EAGAIN``,
  as QEMU's ``qio_channel`` does, so a request that need not wait does not yield.

A TLS stream (``trio.SSLStream``) has no descriptor of its own: it goes through the stream's
own methods. :func:`acquire` takes a free slot or lock the same way. Not yielding is safe for
a caller that waits for something else right after (an NBD request waits for its reply); a
long run of data that never waits yields every :data:`YIELD_EVERY` bytes, so one big reply
cannot hold the run loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

__all__ = ["StreamIO", "acquire"]

#: Bytes received without waiting after which a receiver yields to the other tasks.
YIELD_EVERY = 4 << 20


async def acquire(token: trio.Semaphore | trio.Lock) -> None:
    """``token.acquire()`` without the scheduler pass when it is free at once (trio's own
    ``acquire`` always yields): a request slot or a send lock is nearly always free."""
    try:
        token.acquire_nowait()
    except trio.WouldBlock:
        await token.acquire()


class StreamIO:
    """Receives and sends on a trio stream; on a plain :class:`trio.SocketStream`, directly on
    its descriptor. One receiving task and one sending task at a time (callers serialise)."""

    __slots__ = ("_unyielded", "fd", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.fd: int | None = (stream.socket.fileno()
                               if isinstance(stream, trio.SocketStream) else None)
        self._unyielded = 0

    async def receive_into(self, view: memoryview) -> int:
        """Some bytes into ``view``, at least one; 0 when the peer closed the connection."""
        fd = self.fd
        if fd is None:
            chunk = await self.stream.receive_some(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        while True:
            try:
                got = os.readv(fd, [view])
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            self._unyielded += got
            if self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            return got

    async def receive_exactly_into(self, view: memoryview) -> None:
        """Fill ``view``; :class:`trio.BrokenResourceError` if the stream ends first."""
        n = 0
        while n < len(view):
            got = await self.receive_into(view[n:])
            if not got:
                raise trio.BrokenResourceError("the server closed the connection")
            n += got

    def try_send(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        """Send what the kernel takes now of ``buffers``, in order, without waiting: the
        number of bytes sent (0 on a TLS stream, which has no descriptor)."""
        if self.fd is None:
            return 0
        try:
            return os.writev(self.fd, buffers)
        except BlockingIOError:
            return 0

    async def send_all(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send all of ``buffers``: at once when the kernel takes them (no scheduler pass),
        else the rest as room comes. A caller that must not be cancelled half-way (NBD)
        shields :meth:`send_rest` after :meth:`try_send` instead."""
        sent = self.try_send(buffers)
        if sent < sum(len(buffer) for buffer in buffers):
            await self.send_rest(buffers, sent)

    async def send_rest(self, buffers: Sequence[bytes | bytearray | memoryview],
                        sent: int) -> None:
        """Send what is left of ``buffers`` after the first ``sent`` bytes, waiting for room."""
        for buffer in buffers:
            size = len(buffer)
            if sent >= size:
                sent -= size
                continue
            await self.stream.send_all(memoryview(buffer)[sent:])
            sent = 0
