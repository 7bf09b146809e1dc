"""Monitor behaviour that needs no QEMU: a socket that never appears is a clear, typed error, and the
optional features kvmslots asks a monitor for."""

import asyncio
import socket

import pytest
from fakes import FakeQemu, Q35Fake, ReconnectingFakeQemu

from kvmslots import Monitor, MonitorUnavailable
from kvmslots.monitor import (
    AddsAndViews,
    GreetsWithVersion,
    KeepsConnectionFacts,
    Reconnects,
    RunsQmp,
    TypesProperties,
)


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


def test_the_monitor_has_every_optional_feature_and_the_plain_fake_none(tmp_path):
    # kvmslots asks for the optional features by protocol: a rename in Monitor must not turn one off.
    features = (RunsQmp, GreetsWithVersion, KeepsConnectionFacts, Reconnects, TypesProperties, AddsAndViews)
    monitor = Monitor(tmp_path / "vm.qmp")
    assert all(isinstance(monitor, feature) for feature in features)
    assert not any(isinstance(FakeQemu(), feature) for feature in features)
    assert [f for f in features if isinstance(ReconnectingFakeQemu(), f)] == [Reconnects]
    assert [f for f in features if isinstance(Q35Fake({}), f)] == [KeepsConnectionFacts, AddsAndViews]
