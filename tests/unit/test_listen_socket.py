"""The one-process server's listening socket (`kv3d serve`, server.runtime process)."""

import asyncio
import socket

import pytest

from kv3d.server.local import listen_socket


def test_connections_accepted_on_it_send_without_nagle_delay():
    # With Nagle on, each short response waited for the client's delayed ACK: a 1-token
    # request took ~40 ms longer end to end than the application spent on it.
    async def accepted_nodelay() -> int:
        sock = listen_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(seen, 5)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_taken_port_fails_at_bind():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError):
            listen_socket("127.0.0.1", holder.getsockname()[1])
