"""A VM's QMP monitor, as kvmslots needs it.

Thin on purpose: connect (retrying while QEMU has not created the socket
yet, or while another client holds the monitor), read the PCI view, add a
device, delete a device and wait for *its* ``DEVICE_DELETED``.  Every command
travels as QMP JSON; the only HMP command sent is the fixed ``info pci``, and
never with user input in it.

qemu.qmp's errors are translated into kvmslots' own: a command QEMU refuses
becomes :class:`~kvmslots.errors.QemuCommandError` carrying QEMU's message
and error class, a dropped connection becomes
:class:`~kvmslots.errors.MonitorConnectionLost`.

Every wait is bounded.  A command QEMU does not answer within
``command_timeout`` (a wedged QEMU, or one stopped under a debugger) ends in
:class:`~kvmslots.errors.MonitorTimeout` and the connection is closed, so the
caller's VM lock is released and its records are left for ``reconcile``.  A
wait for an event ends at once, with ``MonitorConnectionLost``, when the
connection closes (QEMU killed): a dead VM is never reported as a guest that
is merely slow to eject.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Protocol, runtime_checkable

import tenacity
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)

from ._shown import shown
from .errors import (
    InvalidTimeout,
    MonitorConnectionLost,
    MonitorError,
    MonitorTimeout,
    MonitorUnavailable,
    QemuCommandError,
    UnplugGuestError,
)
from .pciview import PciOccupancy, parse_info_pci, parse_query_pci

__all__ = [
    "Monitor",
    "MonitorLike",
    "RunsQmp",
    "GreetsWithVersion",
    "KeepsConnectionFacts",
    "Reconnects",
    "TypesProperties",
    "AddsAndViews",
    "DeletedEvents",
    "ALREADY_UNPLUGGING",
    "DEFAULT_COMMAND_TIMEOUT",
    "MAX_WAIT",
    "validate_timeout",
    "command_timeout_from_env",
]

log = logging.getLogger(__name__)

#: QEMU's answer to a second ``device_del`` while one is pending.
ALREADY_UNPLUGGING = "already in the process of unplug"
#: Seconds QEMU has to answer one QMP command (``$KVMSLOTS_QMP_TIMEOUT`` overrides it).  QEMU
#: answers query-pci and device_add in milliseconds; a silence this long means it is wedged.
DEFAULT_COMMAND_TIMEOUT = 15.0
#: The longest wait kvmslots accepts for anything (a day): "forever" is never a timeout.
MAX_WAIT = 86400.0
#: Closing a connection to a wedged QEMU must not become a wait of its own.
_CLOSE_TIMEOUT = 2.0
#: QEMU's transient refusal of device_del while the guest is still powering a native PCIe slot on
#: ("Hot-unplug failed: guest is busy (power indicator blinking)"): retried until the wait ends.
GUEST_BUSY = "guest is busy"
_BUSY_RETRY = 0.05


class _QuietClient(QMPClient):
    """qemu.qmp's client without its per-message debug dump when debug logging is off.

    The base hooks render every message with ``json.dumps(indent=2)`` for a
    debug line even when nobody logs it: 0.3 ms of a 2 KB ``query-pci`` reply,
    a fifth of a hot add.  The hooks are qemu.qmp's documented extension points.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


def validate_timeout(value: object, what: str = "timeout", *, allow_zero: bool = True) -> float:
    """A finite number of seconds in [0, MAX_WAIT] (``inf``, ``nan``, bools and text are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTimeout(f"{what} must be a number of seconds, got {shown(value)}")
    seconds = float(value) if not isinstance(value, int) or abs(value) <= MAX_WAIT else math.inf
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_WAIT or (seconds == 0 and not allow_zero):
        low = "0" if allow_zero else "more than 0"
        raise InvalidTimeout(f"{what} must be {low} to {MAX_WAIT:g} seconds, got {shown(value)}")
    return seconds


def command_timeout_from_env() -> float:
    """``$KVMSLOTS_QMP_TIMEOUT`` validated, else :data:`DEFAULT_COMMAND_TIMEOUT`."""
    text = os.environ.get("KVMSLOTS_QMP_TIMEOUT")
    if not text:
        return DEFAULT_COMMAND_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise InvalidTimeout(f"$KVMSLOTS_QMP_TIMEOUT must be a number of seconds, got {text!r}") from None
    return validate_timeout(value, "$KVMSLOTS_QMP_TIMEOUT", allow_zero=False)


class MonitorLike(Protocol):
    """What the orchestration needs from a monitor (a fake for fault injection implements this)."""

    async def pci(self, *, placement_only: bool = False) -> PciOccupancy:
        """The live PCI view.  Without *placement_only*, its ``peripherals`` must hold the id of every device
        QEMU has, so that a device missing from the buses is never taken for removed; with it, the buses alone
        (enough to choose or verify a slot)."""
        ...

    async def device_add(self, arguments: Mapping[str, Any]) -> None:
        """Send ``device_add``; QEMU's refusal must raise :class:`QemuCommandError` with its message."""
        ...

    async def device_del(
        self,
        qdev_id: str,
        timeout: float,
        on_sent: Callable[[bool], None] | None = None,
        *,
        also: Collection[str] = (),
    ) -> bool:
        """Send ``device_del`` for *qdev_id* and wait up to *timeout* seconds for its ``DEVICE_DELETED`` (and
        those of *also*): True once they all arrived, False when the time ran out.  *on_sent* must be called
        as soon as QEMU has the request; :meth:`Monitor.device_del` is the reference."""
        ...


# Optional features: :class:`Monitor` has them all; a stand-in (the fault-injecting fakes of the
# tests) may lack any of them, and kvmslots then does without (asks again, skips the check).


@runtime_checkable
class RunsQmp(Protocol):
    """A monitor that runs any QMP command (capability probes, ``qom-get``)."""

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return QEMU's answer; its refusal is :class:`QemuCommandError`."""
        ...


@runtime_checkable
class GreetsWithVersion(Protocol):
    """A monitor that knows QEMU's version from the QMP greeting (None: the greeting had none)."""

    @property
    def greeting_version(self) -> tuple[int, int, int] | None:
        """QEMU's (major, minor, micro) from the greeting, or None."""
        ...


@runtime_checkable
class KeepsConnectionFacts(Protocol):
    """A monitor that keeps what kvmslots learnt about its connection until it closes: the
    :class:`~kvmslots.capabilities.QemuCapabilities` (None: not probed yet), each bus's hotplug
    answer, and the placement view as of the last add."""

    capabilities: Any
    bus_hotplug: dict[str, str | None]
    placement_view: PciOccupancy | None


@runtime_checkable
class Reconnects(Protocol):
    """A monitor that can connect again after its connection was lost."""

    async def reconnect(self) -> None:
        """Connect again after the connection was lost; what was learnt about the old one is dropped."""
        ...


@runtime_checkable
class TypesProperties(Protocol):
    """A monitor that tells a device model's property types (``device-list-properties``)."""

    async def property_types(self, driver: str) -> dict[str, str]:
        """``{property: QEMU type}`` of device model *driver*; a model QEMU does not know is
        :class:`QemuCommandError`."""
        ...


@runtime_checkable
class AddsAndViews(Protocol):
    """A monitor that pipelines ``device_add`` with the placement view that follows it."""

    async def device_add_and_view(self, arguments: Mapping[str, Any]) -> PciOccupancy:
        """``device_add``, then the placement view that already shows it.  device_add's error is raised as
        such; a view refused after a successful add must be a :class:`MonitorError`, never a refused add."""
        ...


class Monitor:
    """One QMP connection to one VM.

    Use as ``async with Monitor(path) as mon: ...``.  A single QMP socket
    serves one client at a time, so hold the connection only as long as needed.
    """

    def __init__(
        self,
        address: str | os.PathLike[str],
        *,
        connect_timeout: float = 30.0,
        command_timeout: float | None = None,
    ) -> None:
        self.address = str(Path(address))
        self.connect_timeout = validate_timeout(connect_timeout, "connect_timeout", allow_zero=False)
        self.command_timeout = (
            command_timeout_from_env()
            if command_timeout is None
            else validate_timeout(command_timeout, "command_timeout", allow_zero=False)
        )
        self._qmp = _QuietClient("kvmslots")
        self._has_query_pci: bool | None = None
        self._property_types: dict[str, dict[str, str]] = {}
        #: Facts about this connection's QEMU, kept until it closes (see :mod:`kvmslots.capabilities`).
        self.capabilities: Any = None
        self.bus_hotplug: dict[str, str | None] = {}
        #: The live placement view as of our last add on this connection: QEMU refuses a
        #: device_add to a taken address atomically, so hot add reads it again only on a conflict.
        self.placement_view: PciOccupancy | None = None

    async def __aenter__(self) -> "Monitor":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, retrying with backoff until *connect_timeout*; :class:`MonitorUnavailable` then."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self.connect_timeout),
            wait=tenacity.wait_exponential(multiplier=0.02, max=0.5),
            retry=tenacity.retry_if_exception_type((ConnectError, OSError, asyncio.TimeoutError)),
            reraise=True,
        )
        greeted = True
        try:
            async for attempt in retrying:
                with attempt:
                    # A monitor busy with another client accepts the socket but sends no
                    # greeting until that client leaves: bound each attempt.
                    try:
                        await asyncio.wait_for(
                            self._qmp.connect(self.address), timeout=max(1.0, self.connect_timeout / 4)
                        )
                    except asyncio.TimeoutError:
                        greeted = False
                        self._qmp = _QuietClient("kvmslots")  # a timed-out client is not reusable
                        raise
                    except (ConnectError, OSError, EOFError, QMPError, AssertionError) as exc:
                        # qemu.qmp asserts RUNNING at the end of connect(): a connection that
                        # closes right after the handshake fails that assertion.  Either way:
                        # a fresh client for the next attempt.
                        await self._reset()
                        if isinstance(exc, (ConnectError, OSError)):
                            raise
                        raise ConnectionResetError(f"the monitor closed during the handshake: {exc!r}") from exc
                    if not self.connected:  # closed just after the handshake
                        await self._reset()
                        raise ConnectionResetError("the monitor closed right after the handshake")
        except (ConnectError, OSError, asyncio.TimeoutError) as exc:
            why = (
                "the monitor accepted the connection but never greeted us (another client holds it?)"
                if not greeted
                else _cause(exc)
            )
            raise MonitorUnavailable(
                f"Cannot connect to the QMP monitor at {self.address} within {self.connect_timeout:g}s: "
                f"{why} (is the VM running with -qmp unix:{self.address},server=on,wait=off?)"
            ) from exc

    async def reconnect(self) -> None:
        """Drop whatever is left of the connection and connect again (after a lost connection)."""
        await self._reset()
        await self.connect()

    async def _reset(self) -> None:
        """Close what is left of the connection and start from a fresh client."""
        await self.close()
        self._qmp = _QuietClient("kvmslots")
        self.capabilities, self.bus_hotplug, self.placement_view = None, {}, None

    @property
    def greeting_version(self) -> tuple[int, int, int] | None:
        """QEMU's version from the QMP greeting of this connection, if it gave one."""
        greeting = self._qmp.greeting
        try:
            qemu = greeting._raw["QMP"]["version"]["qemu"]  # type: ignore[union-attr]
            version = (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        return version

    async def close(self) -> None:
        """Disconnect; a connection that already died is not an error here, nor one that hangs."""
        try:
            await asyncio.wait_for(self._qmp.disconnect(), _CLOSE_TIMEOUT)
        except (EOFError, OSError, QMPError, asyncio.TimeoutError) as exc:
            log.debug("QMP disconnect from %s: %r", self.address, exc)
            if self._qmp.runstate is not Runstate.IDLE:
                self._qmp = _QuietClient("kvmslots")  # a client stuck half-closed is not reusable

    @property
    def connected(self) -> bool:
        """Is the connection up (handshake done, not closed since)?"""
        return self._qmp.runstate is Runstate.RUNNING

    def _lost(self, during: str, cause: object = None) -> MonitorConnectionLost:
        detail = f": {cause!r}" if cause is not None else ""
        return MonitorConnectionLost(
            f"QMP connection to {self.address} lost during {during}{detail}", address=self.address, command=during
        )

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command within ``command_timeout``; QEMU's refusal, a lost connection
        and silence become typed errors (after silence, the connection is closed)."""
        if not self.connected:
            raise self._lost(command, "not connected")
        try:
            async with asyncio.timeout(self.command_timeout):  # unlike wait_for, no extra task per command
                return await self._qmp.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QemuCommandError(command, str(exc), exc.error_class) from None
        except asyncio.TimeoutError:
            await self.close()
            raise MonitorTimeout(
                f"QEMU did not answer {command} within {self.command_timeout:g}s at {self.address} "
                "(wedged or stopped?); the connection was closed",
                address=self.address,
                command=command,
                timeout=self.command_timeout,
            ) from None
        except (ExecInterruptedError, EOFError, ConnectionError, QMPError) as exc:
            raise self._lost(command, exc) from exc

    async def _until_disconnected(self) -> None:
        while self._qmp.runstate is Runstate.RUNNING:
            await self._qmp.runstate_changed()

    async def _next_event(self, listener: EventListener, timeout: float | None, waiting_for: str) -> Message | None:
        """The listener's next event; None after *timeout*; :class:`MonitorConnectionLost` as soon
        as the connection closes (QEMU died), instead of waiting out the timeout."""
        get = asyncio.ensure_future(listener.get())
        gone = asyncio.ensure_future(self._until_disconnected())
        try:
            done, _ = await asyncio.wait({get, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, gone):
                if not task.done():
                    task.cancel()
            await asyncio.gather(get, gone, return_exceptions=True)
        if get in done:
            return get.result()
        if gone in done:
            raise self._lost(waiting_for, "the monitor closed (QEMU exited?)")
        return None

    async def query_pci(self) -> PciOccupancy:
        """The view from ``query-pci`` alone, without the fallback or the device ids; :meth:`pci` is what
        callers normally want."""
        return parse_query_pci(await self.execute("query-pci"))

    async def info_pci(self) -> PciOccupancy:
        """The view parsed from HMP ``info pci``, the fallback for QEMUs without ``query-pci``."""
        text = await self.execute("human-monitor-command", {"command-line": "info pci"})
        return parse_info_pci(text)

    async def pci(self, *, placement_only: bool = False) -> PciOccupancy:
        """The live PCI view: ``query-pci`` (or ``info pci`` where QEMU lacks it), plus the ids
        of every device QEMU has, so that absence from the bus view is never taken for removal.

        *placement_only* skips the second part: enough to choose or verify a slot, not to
        conclude that a device is gone.
        """
        view: PciOccupancy | None = None
        if self._has_query_pci is not False:
            try:
                view = await self.query_pci()
                self._has_query_pci = True
            except QemuCommandError as exc:
                if exc.error_class != "CommandNotFound":
                    raise
                self._has_query_pci = False
                log.info("query-pci not available at %s; falling back to info pci", self.address)
        if view is None:
            view = await self.info_pci()
        if not placement_only:
            view.peripherals = frozenset(await self.peripheral_ids())
        return view

    async def device_add_and_view(self, arguments: Mapping[str, Any]) -> PciOccupancy:
        """``device_add``, with ``query-pci`` sent right behind it (pipelined).

        QMP handles one connection's commands in order, so the view already
        shows what the add did, and the round trip of a second request is saved.
        device_add's error, if any, is raised (the view's answer is still read).
        """
        added, view = await asyncio.gather(
            self.device_add(arguments), self.pci(placement_only=True), return_exceptions=True
        )
        if isinstance(added, BaseException):
            raise added
        if isinstance(view, QemuCommandError):  # QEMU took the device: this must not read as a refused add
            raise MonitorError(
                f"QEMU took device_add of {arguments.get('id')} but then refused query-pci: {view}"
            ) from view
        if isinstance(view, BaseException):
            raise view
        return view

    async def peripheral_ids(self) -> list[str]:
        """Ids of all user-created devices (``qom-list /machine/peripheral``), whatever their bus state."""
        children = await self.execute("qom-list", {"path": "/machine/peripheral"})
        return [c["name"] for c in children if str(c.get("type", "")).startswith("child<")]

    async def device_add(self, arguments: Mapping[str, Any]) -> None:
        """Send ``device_add`` with *arguments* (QMP JSON).  QEMU's refusal is :class:`QemuCommandError` with
        its message; nothing waits for the guest."""
        await self.execute("device_add", arguments)

    async def property_types(self, driver: str) -> dict[str, str]:
        """``{property: QEMU type}`` of a device model (``device-list-properties``), cached per
        connection; how text values given by a user are typed before ``device_add``."""
        if driver not in self._property_types:
            props = await self.execute("device-list-properties", {"typename": driver})
            self._property_types[driver] = {
                str(p["name"]): str(p.get("type", "")) for p in props if isinstance(p, Mapping) and "name" in p
            }
        return self._property_types[driver]

    async def device_del(
        self,
        qdev_id: str,
        timeout: float,
        on_sent: Callable[[bool], None] | None = None,
        *,
        also: Collection[str] = (),
    ) -> bool:
        """Ask QEMU to unplug *qdev_id* and wait for its ``DEVICE_DELETED``.

        Returns True when removal is confirmed, False when *timeout* passed
        first (the guest has not ejected it yet).  A ``device_del`` already
        pending is waited on again.  ``DEVICE_UNPLUG_GUEST_ERROR`` raises
        :class:`UnplugGuestError`; an unknown id raises ``QemuCommandError``
        with error class ``DeviceNotFound``; a connection that closes during
        the wait raises :class:`MonitorConnectionLost` at once.

        *on_sent* is called once QEMU has the request, before the wait, with
        True if it was already pending: the caller records that the unplug was
        requested, so a crash during the wait is never taken for "never sent".

        *also* names devices that leave with it (the other functions of its
        multifunction slot: QEMU unplugs a slot whole); True then means every
        one of them has its ``DEVICE_DELETED``.  QEMU's "guest is busy" refusal
        (a native PCIe slot still powering on right after its hot add) is
        retried within *timeout*.
        """

        timeout = validate_timeout(timeout)  # before QEMU is asked anything
        waiting = {qdev_id, *also}
        # virtio devices first emit DEVICE_DELETED for their backend child, with a path and no id.
        listener = EventListener(
            ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"), lambda event: _event_device(event) in waiting
        )
        loop = asyncio.get_running_loop()
        with self._qmp.listen(listener):  # registered before the command: the event cannot slip by
            already = False
            deadline = loop.time() + timeout
            while True:
                try:
                    await self.execute("device_del", {"id": qdev_id})
                except QemuCommandError as exc:
                    if GUEST_BUSY in exc.qemu_message and loop.time() + _BUSY_RETRY < deadline:
                        await asyncio.sleep(_BUSY_RETRY)  # the slot is still powering on: ask again
                        continue
                    if ALREADY_UNPLUGGING not in exc.qemu_message:
                        raise
                    already = True
                break
            if on_sent is not None:
                on_sent(already)
            while waiting:
                event = await self._next_event(
                    listener, max(0.0, deadline - loop.time()), f"the DEVICE_DELETED wait for {qdev_id}"
                )
                if event is None:
                    return False
                if event["event"] == "DEVICE_UNPLUG_GUEST_ERROR":
                    raise UnplugGuestError(qdev_id, f"QEMU reported DEVICE_UNPLUG_GUEST_ERROR {event.get('data')}")
                waiting.discard(str(_event_device(event)))
        return True

    @contextlib.contextmanager
    def deleted_events(self, qdev_ids: set[str]) -> Iterator["DeletedEvents"]:
        """Listen for ``DEVICE_DELETED`` of any of *qdev_ids* while the block runs.

        Register first, then look at ``query-pci``: a removal that happened
        before the listener existed shows as absence, one after it as an event.
        """
        listener = EventListener("DEVICE_DELETED", lambda event: _event_device(event) in qdev_ids)
        with self._qmp.listen(listener):
            yield DeletedEvents(self, listener)


class DeletedEvents:
    """The ``DEVICE_DELETED`` events of a set of ids, one at a time."""

    def __init__(self, monitor: Monitor, listener: EventListener) -> None:
        self._monitor = monitor
        self._listener = listener

    async def next(self, timeout: float | None) -> str | None:
        """The id of the next deleted device, or None when *timeout* passes first;
        :class:`MonitorConnectionLost` at once if the connection closes."""
        event = await self._monitor._next_event(self._listener, timeout, "the DEVICE_DELETED wait")
        return None if event is None else str(_event_device(event))


def _event_device(event: Message) -> str | None:
    """The ``data.device`` of a QMP event (the qdev id), if it has one."""
    data = event.get("data")
    device = data.get("device") if isinstance(data, Mapping) else None
    return device if isinstance(device, str) else None


def _cause(exc: BaseException) -> str:
    inner = getattr(exc, "exc", None) or exc.__cause__
    return f"{inner!r}" if inner else f"{exc!r}"
