"""A fault-injecting QMP proxy, so the tests can break a real monitor connection on cue.

Why this exists
---------------
kvmslots promises that every multi-step operation (persist the intent, act,
verify, commit) survives a monitor that vanishes or hangs halfway: the undo
path runs, a restart finishes or undoes what a crash left.  Fake monitors
(``tests/fakes.py``) test that logic, but only a real QEMU shows what really
reaches the wire: whether a ``device_add`` was already executed when the
connection died, what qemu.qmp raises, whether QEMU serves the next client.
This harness sits between a QMP client (a :class:`kvmslots.Monitor`, a raw
socket, a forked child process) and QEMU's QMP socket and, at exactly the
message a test names, drops the connection, stalls it, or kills a process::

    with QmpFaultProxy(vm.qmp_path) as proxy:
        proxy.arm("c2s", 3, "before", "drop")     # the 3rd message to QEMU never arrives
        ...  Monitor(proxy.listen) ...            # the client sees a lost connection
        assert proxy.fired, proxy.describe()

How it works
------------
Each accepted client gets its own fresh connection to QEMU (QEMU serves one
QMP client at a time, so when either side of a pair closes, the other side is
closed at once, and the next pair gets QEMU's greeting).  Both byte streams
are cut into messages by :class:`JsonStreamSplitter`: QMP messages are JSON
objects, but qemu.qmp ends its messages with no newline at all and may
pipeline several in one write, while QEMU ends each of its own with
``"\\r\\n"``; so the splitter tracks ``{}``/``[]`` depth outside strings rather
than reading lines.  A message is forwarded as soon as its closing brace is
seen, together with any whitespace following it in the same read; whitespace
on its own is forwarded at once.

Messages are counted per direction, 1-based: ``"c2s"`` (client to QEMU) and
``"s2c"`` (QEMU to client: the greeting, replies and events).  The counters
are global across connections and restart at every :meth:`QmpFaultProxy.arm`
(so a client's reconnect in its undo path is still counted).  Messages that a
stalled or closing pair swallows are not counted.  One fault fires once; after
it, everything passes through untouched until the next ``arm()``.

The proxy runs its own asyncio event loop in a daemon thread, so a test may
drive it from synchronous code, from its own event loop, or while a process
forked from the test (``multiprocessing.get_context("fork")``) is the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = ["QmpFaultProxy", "Fault", "JsonStreamSplitter", "split_messages", "DIRECTIONS", "WHENS", "ACTIONS"]

log = logging.getLogger(__name__)

Direction = Literal["c2s", "s2c"]
When = Literal["before", "after"]
Action = Literal["stall", "drop", "kill"]

DIRECTIONS: tuple[Direction, ...] = ("c2s", "s2c")
WHENS: tuple[When, ...] = ("before", "after")
ACTIONS: tuple[Action, ...] = ("stall", "drop", "kill")

_T = TypeVar("_T")

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_READ_SIZE = 65536
_TRANSCRIPT_CHARS = 120
_THREAD_TIMEOUT = 10.0  # seconds to wait for the proxy's loop to do what another thread asked


# --- cutting a byte stream into JSON values ------------------------------------------------

_OPEN = re.compile(rb"[{\[]")
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


class JsonStreamSplitter:
    """Cuts a byte stream into top-level JSON objects (or arrays), across reads.

    :meth:`feed` returns pieces ``(data, is_message)``.  A message piece is one
    complete value plus the whitespace right after it *in the same feed*;
    anything outside a value that is not attached that way (whitespace that
    arrives on its own, stray bytes) is a non-message piece, returned at once
    so that, e.g., a ``"\\r\\n"`` arriving in a later read is never held back.
    Bytes of a value that is not complete yet are kept until it is.  The
    concatenation of all pieces is exactly the input.

    Only the structure is tracked (depth of ``{}``/``[]`` outside strings,
    backslash escapes inside them); the JSON is not validated.  Multi-byte
    UTF-8 never contains ASCII bytes, so working on bytes is safe.
    """

    def __init__(self) -> None:
        self._partial = bytearray()  # the value being read, from earlier feeds
        self._depth = 0
        self._in_string = False
        self._escape = False

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete value, held until it completes."""
        return bytes(self._partial)

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        pieces: list[tuple[bytes, bool]] = []
        i, n = 0, len(data)
        start = 0  # where the current value's bytes begin in *data* (when depth > 0)
        while i < n:
            if self._depth == 0:
                if pieces and pieces[-1][1]:  # whitespace right after a message travels with it
                    ws = _WHITESPACE.match(data, i)
                    if ws:
                        pieces[-1] = (pieces[-1][0] + ws.group(), True)
                        i = ws.end()
                        continue
                found = _OPEN.search(data, i)
                stop = found.start() if found else n
                if stop > i:
                    pieces.append((data[i:stop], False))
                if not found:
                    break
                self._depth, start, i = 1, stop, stop + 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                found = _IN_STRING.search(data, i)
                if not found:
                    i = n
                elif found.group() == b"\\":
                    self._escape, i = True, found.end()
                else:
                    self._in_string, i = False, found.end()
            else:
                found = _STRUCTURAL.search(data, i)
                if not found:
                    i = n
                    continue
                char, i = found.group(), found.end()
                if char == b'"':
                    self._in_string = True
                elif char in b"{[":
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        pieces.append((bytes(self._partial) + data[start:i], True))
                        self._partial.clear()
        if self._depth > 0:
            self._partial += data[start:]
        return pieces


def split_messages(chunks: list[bytes]) -> list[bytes]:
    """The complete messages in *chunks* read one after the other (whitespace stripped)."""
    splitter = JsonStreamSplitter()
    return [piece.strip() for chunk in chunks for piece, is_message in splitter.feed(chunk) if is_message]


# --- the proxy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One armed fault (see :meth:`QmpFaultProxy.arm`)."""

    direction: Direction
    index: int
    when: When
    action: Action
    kill: Callable[[], object] | None = None


class _Pair:
    """One client connection and its own upstream connection to QEMU."""

    def __init__(self, number: int, client: asyncio.StreamWriter) -> None:
        self.number = number
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.stalled = False
        self.closed = False

    def close(self) -> None:
        """Close both sides now (what is already buffered is still flushed)."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()


class QmpFaultProxy:
    """A QMP proxy from *listen* to QEMU's socket *upstream* that can break one message on cue.

    *listen* defaults to ``qmp.sock`` in a private 0700 directory under /tmp
    (removed on :meth:`stop`).  The socket file is made 0600.  Use as a
    context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(self, upstream: str | os.PathLike[str], listen: str | os.PathLike[str] | None = None) -> None:
        self.upstream = str(upstream)
        self._private_dir: Path | None = None
        if listen is None:
            self._private_dir = Path(tempfile.mkdtemp(prefix="qmpproxy-", dir="/tmp"))  # 0700
            listen = self._private_dir / "qmp.sock"
        self.listen = str(listen)
        if len(os.fsencode(self.listen)) > _SUN_PATH_MAX:
            self._remove_private_dir()
            raise ValueError(f"socket path too long for AF_UNIX: {self.listen}")
        #: set (after the fault's action is done) when the armed fault fired
        self.fired_event = threading.Event()
        #: what the ``kill`` callable raised, if it raised
        self.kill_error: BaseException | None = None
        self._lock = threading.Lock()  # guards the fields below, shared with the loop thread
        self._fault: Fault | None = None
        self._counts: dict[Direction, int] = {"c2s": 0, "s2c": 0}
        self._transcript: list[tuple[Direction, int, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[_Pair] = set()  # loop thread only
        self._tasks: set[asyncio.Task[None]] = set()  # loop thread only
        self._numbers = itertools.count(1)

    def __repr__(self) -> str:
        return f"<QmpFaultProxy {self.listen} -> {self.upstream} fault={self._fault} fired={self.fired}>"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> QmpFaultProxy:
        """Start serving *listen* from a daemon thread; returns once the socket accepts."""
        if self._thread is not None:
            raise RuntimeError("this proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="qmp-fault-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._serve())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close every pair and the listening socket, end the thread, remove the files. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_THREAD_TIMEOUT)
        if loop is not None and thread is not None and not thread.is_alive() and not loop.is_closed():
            loop.close()
        self._loop = self._thread = None
        with contextlib.suppress(FileNotFoundError):
            if Path(self.listen).is_socket():
                os.unlink(self.listen)
        self._remove_private_dir()

    def __enter__(self) -> QmpFaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- faults -----------------------------------------------------------------------------

    def arm(
        self,
        direction: Direction,
        index: int,
        when: When,
        action: Action,
        *,
        kill: Callable[[], object] | None = None,
    ) -> None:
        """Fire *action* once, at the *index*-th (1-based) message of *direction* from now on.

        Restarts the counters and the transcript and clears :attr:`fired`.
        ``when="before"``: the message is not forwarded; ``"after"``: it is,
        then the fault happens.  Actions, on the connection pair that carries
        the message: ``"stall"`` forwards nothing more either way (EOF from
        either side still closes both), ``"drop"`` closes both sides,
        ``"kill"`` calls *kill()* (in the proxy's thread) and then closes both.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if when not in WHENS:
            raise ValueError(f"when must be one of {WHENS}, not {when!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 1:
            raise ValueError(f"index must be an integer >= 1 (counting is 1-based), not {index!r}")
        if (action == "kill") != (kill is not None):
            raise ValueError("kill= is required for action 'kill' and only for it")
        with self._lock:
            self._fault = Fault(direction, index, when, action, kill)
            self._counts = {"c2s": 0, "s2c": 0}
            self._transcript = []
            self.kill_error = None
            self.fired_event.clear()

    def disarm(self) -> None:
        """Forget the armed fault, if it has not fired yet (counters keep running)."""
        with self._lock:
            self._fault = None

    @property
    def armed(self) -> Fault | None:
        """The fault waiting to fire, if any."""
        with self._lock:
            return self._fault

    @property
    def fired(self) -> bool:
        """Whether the fault armed last has fired (and its action is done)."""
        return self.fired_event.is_set()

    def counts(self) -> dict[Direction, int]:
        """Messages seen per direction since the last :meth:`arm` (or since start)."""
        with self._lock:
            return dict(self._counts)

    @property
    def transcript(self) -> list[tuple[Direction, int, str]]:
        """``(direction, index, first 120 characters)`` of every message since the last arm()."""
        with self._lock:
            return list(self._transcript)

    def describe(self) -> str:
        """The armed fault, the counters and the transcript, for an assertion message."""
        with self._lock:
            lines = [f"fault={self._fault} fired={self.fired} counts={self._counts}"]
            lines += [f"  {direction} #{index}: {text}" for direction, index, text in self._transcript]
        return "\n".join(lines)

    def connections(self) -> int:
        """How many client connections the proxy holds right now."""
        return self._call(self._count_pairs())

    def close_all(self) -> None:
        """Close every live pair (after a stall or a kill, before talking to QEMU directly).

        Not callable from *kill* (it runs in the proxy's own thread).
        """
        self._call(self._close_all())

    # --- the event loop thread ------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run *coro* on the proxy's loop and wait for its result (from any other thread)."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the proxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("this method cannot be called from the proxy's own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_THREAD_TIMEOUT)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _serve(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.listen)
        os.chmod(self.listen, 0o600)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_THREAD_TIMEOUT)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _close_all(self) -> None:
        for pair in list(self._pairs):
            pair.close()
        await asyncio.sleep(0)  # let the pumps see their EOFs

    async def _count_pairs(self) -> int:
        return sum(1 for pair in self._pairs if not pair.closed)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pair = _Pair(next(self._numbers), client_w)
        self._pairs.add(pair)
        try:
            try:
                upstream_r, pair.upstream = await asyncio.open_unix_connection(self.upstream)
            except OSError as exc:
                log.warning("pair %d: cannot connect to QEMU at %s: %r", pair.number, self.upstream, exc)
                return
            log.debug("pair %d: connected", pair.number)
            pumps = [
                asyncio.create_task(self._pump(pair, "c2s", client_r, pair.upstream)),
                asyncio.create_task(self._pump(pair, "s2c", upstream_r, client_w)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pair.close()  # one side ended: end the other, so QEMU greets the next client
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            pair.close()
            self._pairs.discard(pair)
            self._tasks.discard(task)
            log.debug("pair %d: closed", pair.number)

    async def _pump(
        self, pair: _Pair, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward one direction of a pair, message by message, until EOF or the pair closes."""
        splitter = JsonStreamSplitter()
        try:
            while not pair.closed:
                data = await reader.read(_READ_SIZE)
                if not data:
                    return
                if pair.stalled:
                    continue  # swallow, but keep reading so that EOF is noticed
                for piece, is_message in splitter.feed(data):
                    fault = self._see(direction, piece) if is_message else None
                    if fault is None:
                        writer.write(piece)
                        continue
                    if fault.when == "after":
                        writer.write(piece)
                    self._fire(pair, fault)
                    break
                if pair.closed:
                    return
                if not pair.stalled:
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("pair %d %s: %r", pair.number, direction, exc)

    def _see(self, direction: Direction, message: bytes) -> Fault | None:
        """Count one message; return the fault it triggers (taking it, so it fires once)."""
        with self._lock:
            self._counts[direction] += 1
            index = self._counts[direction]
            text = message.strip().decode("utf-8", "replace")[:_TRANSCRIPT_CHARS]
            self._transcript.append((direction, index, text))
            fault = self._fault
            if fault is None or fault.direction != direction or fault.index != index:
                return None
            self._fault = None
            return fault

    def _fire(self, pair: _Pair, fault: Fault) -> None:
        log.debug("pair %d: firing %s", pair.number, fault)
        if fault.action == "stall":
            pair.stalled = True
        elif fault.action == "drop":
            pair.close()
        else:
            assert fault.kill is not None
            try:
                fault.kill()
            except BaseException as exc:  # report it; the proxy thread must survive
                log.error("kill callable of %s raised %r", fault, exc)
                self.kill_error = exc
            pair.close()
        self.fired_event.set()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
