"""Monitor behaviour that needs no QEMU: a socket that never appears is a clear, typed error."""

import asyncio
import socket

import pytest

from kvmslots import Monitor, MonitorUnavailable


def test_missing_socket_gives_monitor_unavailable_after_retrying(tmp_path):
    async def connect():
        async with Monitor(tmp_path / "nope.sock", connect_timeout=0.5):
            pass

    with pytest.raises(MonitorUnavailable, match="nope.sock") as info:
        asyncio.run(connect())
    assert "server=on" in str(info.value)


def test_a_socket_that_never_greets_times_out(tmp_path):
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    try:
        async def connect():
            async with Monitor(path, connect_timeout=1.0):
                pass

        with pytest.raises(MonitorUnavailable, match="never greeted"):
            asyncio.run(connect())
    finally:
        server.close()
