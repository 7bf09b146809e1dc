"""The fault-injecting QMP proxy (integration/qmpproxy.py), against a real QEMU in qtest mode.

The proxy is test equipment: a fault test that passes because the proxy
silently did nothing would be worse than no test, so these tests pin down
that it is transparent when unarmed and that each fault does exactly what it
says, as seen by kvmslots' Monitor, by a raw socket client and by QEMU.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmslots import Monitor
from kvmslots.errors import MonitorConnectionLost
from kvmslots.testvm import TestVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qmpproxy import JsonStreamSplitter, QmpFaultProxy, split_messages  # noqa: E402

TESTDEV = {"driver": "pci-testdev", "id": "proxied5", "addr": "0x5"}


@pytest.fixture
def proxy(qtest_vm: TestVM) -> Iterator[QmpFaultProxy]:
    with QmpFaultProxy(qtest_vm.qmp_path) as p:
        yield p


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def raw_execute(path: str | os.PathLike[str], command: str, arguments: dict[str, Any] | None = None) -> Any:
    async with Monitor(path, connect_timeout=5) as mon:
        return await mon.execute(command, arguments)


# --- the splitter, no QEMU -----------------------------------------------------------------


def test_splitter_two_objects_in_one_chunk_without_newlines() -> None:
    pieces = JsonStreamSplitter().feed(b'{"execute":"a"}{"execute":"b","id":"x"}')
    assert pieces == [(b'{"execute":"a"}', True), (b'{"execute":"b","id":"x"}', True)]


def test_splitter_objects_split_across_chunks() -> None:
    splitter = JsonStreamSplitter()
    assert splitter.feed(b'{"return": [{"bus": 0, "dev') == []
    assert splitter.pending == b'{"return": [{"bus": 0, "dev'
    assert splitter.feed(b'ices": []}]}\r\n{"event": "X"') == [(b'{"return": [{"bus": 0, "devices": []}]}\r\n', True)]
    assert splitter.feed(b"}") == [(b'{"event": "X"}', True)]
    # whitespace arriving on its own is handed on at once, never held back for the next message
    assert splitter.feed(b"\r\n") == [(b"\r\n", False)]
    assert splitter.pending == b""
    # one byte at a time
    text = b'{"a": {"b": [1, 2, {"c": "d"}]}}\r\n'
    assert split_messages([bytes([c]) for c in text]) == [text.strip()]


def test_splitter_strings_with_braces_and_escaped_quotes() -> None:
    tricky = [
        {"execute": "human-monitor-command", "arguments": {"command-line": 'echo "}{" ]['}},
        {"s": 'a \\" b \\\\" c }'},  # escaped backslash then a real quote
        {"return": "ends with backslash \\", "k": ["[", "{", "}"]},
        {"unicode": "stra\u00dfe \u2603 }"},
    ]
    stream = b"".join(json.dumps(m, ensure_ascii=False).encode() + b"\r\n" for m in tricky)
    for size in (1, 2, 3, 7, len(stream)):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert [json.loads(m) for m in split_messages(chunks)] == tricky, size
    # an escape split across chunks: the backslash ends one chunk, the quote starts the next
    splitter = JsonStreamSplitter()
    assert splitter.feed(b'{"a": "x\\') == []
    assert splitter.feed(b'"}"}') == [(b'{"a": "x\\"}"}', True)]


def test_splitter_keeps_every_byte() -> None:
    stream = b' \r\n{"a": 1}  \n{"b": "}"}\r\n\r\n[1, [2]] {"c"'
    splitter = JsonStreamSplitter()
    pieces = [piece for i in range(0, len(stream), 5) for piece in splitter.feed(stream[i : i + 5])]
    assert b"".join(data for data, _ in pieces) + splitter.pending == stream
    assert [data.strip() for data, is_message in pieces if is_message] == [b'{"a": 1}', b'{"b": "}"}', b"[1, [2]]"]


def test_arm_rejects_nonsense(tmp_path: Path) -> None:
    proxy = QmpFaultProxy(tmp_path / "nowhere.sock")
    try:
        with pytest.raises(ValueError):
            proxy.arm("up", 1, "before", "drop")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            proxy.arm("c2s", 0, "before", "drop")
        with pytest.raises(ValueError):
            proxy.arm("c2s", 1, "during", "drop")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            proxy.arm("c2s", 1, "before", "kill")  # kill needs its callable
        with pytest.raises(ValueError):
            proxy.arm("c2s", 1, "before", "drop", kill=lambda: None)
    finally:
        proxy.stop()


# --- pass-through --------------------------------------------------------------------------


def test_pass_through_is_transparent_and_counted(qtest_vm: TestVM, proxy: QmpFaultProxy) -> None:
    listen = Path(proxy.listen)
    assert stat.S_IMODE(listen.stat().st_mode) == 0o600
    assert stat.S_IMODE(listen.parent.stat().st_mode) == 0o700

    async def scenario() -> None:
        async with Monitor(qtest_vm.qmp_path) as mon:
            direct_before = await mon.query_pci()
        proxy.arm("c2s", 99, "before", "drop")  # armed but never reached: counts restart here
        async with Monitor(proxy.listen) as mon:
            proxied_before = await mon.query_pci()  # c2s #2
            view = await mon.device_add_and_view(TESTDEV)  # c2s #3 and #4, pipelined in one write
        assert proxy.counts() == {"c2s": 4, "s2c": 5}, proxy.describe()
        async with Monitor(qtest_vm.qmp_path) as mon:
            direct_after = await mon.query_pci()
        assert proxied_before == direct_before and proxied_before.functions == direct_before.functions
        assert view == direct_after and view.functions == direct_after.functions
        assert view.find("proxied5") is not None and view.slots(0) == direct_before.slots(0) | {5}
        # raw replies through the proxy are byte-for-byte what QEMU gives directly
        assert await raw_execute(proxy.listen, "query-pci") == await raw_execute(qtest_vm.qmp_path, "query-pci")

    asyncio.run(scenario())
    assert not proxy.fired
    transcript = proxy.transcript
    assert transcript[0][:2] == ("s2c", 1) and transcript[0][2].startswith('{"QMP"')
    assert transcript[1][:2] == ("c2s", 1) and '"qmp_capabilities"' in transcript[1][2]
    commands = [text for direction, _, text in transcript if direction == "c2s"]
    assert ['"query-pci"' in commands[1], '"device_add"' in commands[2], '"query-pci"' in commands[3]] == [True] * 3
    assert wait_until(lambda: proxy.connections() == 0)


def test_pass_through_from_synchronous_code_with_pipelined_unterminated_commands(proxy: QmpFaultProxy) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(proxy.listen)
        reader = sock.makefile("rb")
        assert b'"QMP"' in reader.readline()
        # two commands in one write, no newline after either: only a JSON-aware proxy forwards them
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": "q}{\\""}')
        assert json.loads(reader.readline()) == {"return": {}}
        status = json.loads(reader.readline())
        assert status["id"] == 'q}{"' and status["return"]["status"] == "prelaunch"
        assert proxy.counts() == {"c2s": 2, "s2c": 3}
        reader.close()
    assert wait_until(lambda: proxy.connections() == 0)


# --- faults --------------------------------------------------------------------------------


def test_drop_before_c2s_2_loses_the_connection_then_passes_through(qtest_vm: TestVM, proxy: QmpFaultProxy) -> None:
    proxy.arm("c2s", 2, "before", "drop")

    async def scenario() -> None:
        mon = Monitor(proxy.listen, connect_timeout=5)
        await mon.connect()
        try:
            with pytest.raises(MonitorConnectionLost):
                await asyncio.wait_for(mon.query_pci(), 5)
        finally:
            await mon.close()
        assert proxy.fired, proxy.describe()
        async with Monitor(proxy.listen, connect_timeout=5) as again:
            assert (await again.query_pci()).slots(0) == {0, 1, 2, 3}

    asyncio.run(scenario())
    assert proxy.counts()["c2s"] == 4, proxy.describe()  # the dropped one counts; then caps + query-pci


def test_drop_before_the_reply_hides_a_command_qemu_executed(qtest_vm: TestVM, proxy: QmpFaultProxy) -> None:
    """The case the harness is for: device_add happened, but the client never hears so."""
    proxy.arm("s2c", 3, "before", "drop")  # greeting, caps reply, then device_add's reply

    async def scenario() -> None:
        async with Monitor(proxy.listen, connect_timeout=5) as mon:
            with pytest.raises(MonitorConnectionLost):
                await asyncio.wait_for(mon.device_add(TESTDEV), 5)
        async with Monitor(qtest_vm.qmp_path, connect_timeout=5) as direct:
            assert (await direct.query_pci()).find("proxied5") is not None

    asyncio.run(scenario())
    assert proxy.fired and '"device_add"' in proxy.transcript[-2][2], proxy.describe()


def test_stall_after_c2s_2_never_answers_until_the_client_leaves(qtest_vm: TestVM, proxy: QmpFaultProxy) -> None:
    proxy.arm("c2s", 2, "after", "stall")

    async def scenario() -> None:
        async with Monitor(proxy.listen, connect_timeout=5) as mon:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(mon.query_pci(), 1.0)
            assert proxy.fired
            assert proxy.counts() == {"c2s": 2, "s2c": 2}, proxy.describe()  # QEMU's reply was swallowed
        assert await asyncio.to_thread(wait_until, lambda: proxy.connections() == 0)
        async with Monitor(proxy.listen, connect_timeout=5) as again:
            assert (await again.query_pci()).slots(0) == {0, 1, 2, 3}

    asyncio.run(scenario())


def _query_forever(listen: str, go: Any) -> None:
    """A forked child: one monitor connection through the proxy, commands in a loop."""
    go.wait(10)

    async def loop() -> None:
        async with Monitor(listen, connect_timeout=5) as mon:
            while True:
                await mon.query_pci()

    asyncio.run(loop())


def test_kill_a_forked_client_at_c2s_3(qtest_vm: TestVM, proxy: QmpFaultProxy) -> None:
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    child = ctx.Process(target=_query_forever, args=(proxy.listen, go), daemon=True)
    child.start()
    try:
        assert child.pid is not None
        pid = child.pid
        proxy.arm("c2s", 3, "before", "kill", kill=lambda: os.kill(pid, signal.SIGKILL))
        go.set()
        child.join(10)
        assert child.exitcode == -signal.SIGKILL, proxy.describe()
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    assert proxy.fired and proxy.kill_error is None
    assert [(d, i) for d, i, _ in proxy.transcript if d == "c2s"] == [("c2s", 1), ("c2s", 2), ("c2s", 3)]
    proxy.close_all()

    async def after() -> None:
        async with Monitor(qtest_vm.qmp_path, connect_timeout=5) as direct:  # QEMU serves a new client
            assert (await direct.query_pci()).slots(0) == {0, 1, 2, 3}
        async with Monitor(proxy.listen, connect_timeout=5) as again:
            assert (await again.query_pci()).slots(0) == {0, 1, 2, 3}

    asyncio.run(after())
