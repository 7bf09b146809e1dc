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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import tenacity
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError

from .errors import MonitorConnectionLost, MonitorUnavailable, QemuCommandError, UnplugGuestError
from .pciview import PciOccupancy, parse_info_pci, parse_query_pci

__all__ = ["Monitor", "MonitorLike", "DeletedEvents", "ALREADY_UNPLUGGING"]

log = logging.getLogger(__name__)

#: QEMU's answer to a second ``device_del`` while one is pending.
ALREADY_UNPLUGGING = "already in the process of unplug"


class MonitorLike(Protocol):
    """What the orchestration needs from a monitor (a fake for fault injection implements this)."""

    async def pci(self, *, placement_only: bool = False) -> PciOccupancy: ...

    async def device_add(self, arguments: Mapping[str, Any]) -> None: ...

    async def device_del(self, qdev_id: str, timeout: float) -> bool: ...


class Monitor:
    """One QMP connection to one VM.

    Use as ``async with Monitor(path) as mon: ...``.  A single QMP socket
    serves one client at a time, so hold the connection only as long as needed.
    """

    def __init__(self, address: str | os.PathLike[str], *, connect_timeout: float = 30.0) -> None:
        self.address = str(Path(address))
        self.connect_timeout = connect_timeout
        self._qmp = QMPClient("kvmslots")
        self._has_query_pci: bool | None = None

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
                        self._qmp = QMPClient("kvmslots")  # a timed-out client is not reusable
                        raise
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
        await self.close()
        self._qmp = QMPClient("kvmslots")
        await self.connect()

    async def close(self) -> None:
        """Disconnect; a connection that already died is not an error here."""
        try:
            await self._qmp.disconnect()
        except (EOFError, OSError, QMPError) as exc:
            log.debug("QMP disconnect from %s: %r", self.address, exc)

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command; QEMU's refusal and a lost connection become typed errors."""
        try:
            return await self._qmp.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise QemuCommandError(command, str(exc), exc.error_class) from None
        except (ExecInterruptedError, EOFError, ConnectionError, QMPError) as exc:
            raise MonitorConnectionLost(f"QMP connection to {self.address} lost during {command}: {exc!r}") from exc

    async def query_pci(self) -> PciOccupancy:
        return parse_query_pci(await self.execute("query-pci"))

    async def info_pci(self) -> PciOccupancy:
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
        if isinstance(view, BaseException):
            raise view
        return view

    async def peripheral_ids(self) -> list[str]:
        """Ids of all user-created devices (``qom-list /machine/peripheral``), whatever their bus state."""
        children = await self.execute("qom-list", {"path": "/machine/peripheral"})
        return [c["name"] for c in children if str(c.get("type", "")).startswith("child<")]

    async def device_add(self, arguments: Mapping[str, Any]) -> None:
        await self.execute("device_add", arguments)

    async def device_del(self, qdev_id: str, timeout: float) -> bool:
        """Ask QEMU to unplug *qdev_id* and wait for its ``DEVICE_DELETED``.

        Returns True when removal is confirmed, False when *timeout* passed
        first (the guest has not ejected it yet).  A ``device_del`` already
        pending is waited on again.  ``DEVICE_UNPLUG_GUEST_ERROR`` raises
        :class:`UnplugGuestError`; an unknown id raises ``QemuCommandError``
        with error class ``DeviceNotFound``.
        """

        # virtio devices first emit DEVICE_DELETED for their backend child, with a path and no id.
        listener = EventListener(
            ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"), lambda event: _event_device(event) == qdev_id
        )
        with self._qmp.listen(listener):  # registered before the command: the event cannot slip by
            try:
                await self.execute("device_del", {"id": qdev_id})
            except QemuCommandError as exc:
                if ALREADY_UNPLUGGING not in exc.qemu_message:
                    raise
            try:
                event = await asyncio.wait_for(listener.get(), timeout)
            except asyncio.TimeoutError:
                return False
        if event["event"] == "DEVICE_UNPLUG_GUEST_ERROR":
            raise UnplugGuestError(qdev_id, f"QEMU reported DEVICE_UNPLUG_GUEST_ERROR {event.get('data')}")
        return True

    @contextlib.contextmanager
    def deleted_events(self, qdev_ids: set[str]) -> Iterator["DeletedEvents"]:
        """Listen for ``DEVICE_DELETED`` of any of *qdev_ids* while the block runs.

        Register first, then look at ``query-pci``: a removal that happened
        before the listener existed shows as absence, one after it as an event.
        """
        listener = EventListener("DEVICE_DELETED", lambda event: _event_device(event) in qdev_ids)
        with self._qmp.listen(listener):
            yield DeletedEvents(listener)


class DeletedEvents:
    """The ``DEVICE_DELETED`` events of a set of ids, one at a time."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def next(self, timeout: float | None) -> str | None:
        """The id of the next deleted device, or None when *timeout* passes first."""
        try:
            event = await asyncio.wait_for(self._listener.get(), timeout)
        except asyncio.TimeoutError:
            return None
        return str(_event_device(event))


def _event_device(event: Message) -> str | None:
    """The ``data.device`` of a QMP event (the qdev id), if it has one."""
    data = event.get("data")
    device = data.get("device") if isinstance(data, Mapping) else None
    return device if isinstance(device, str) else None


def _cause(exc: BaseException) -> str:
    inner = getattr(exc, "exc", None) or exc.__cause__
    return f"{inner!r}" if inner else f"{exc!r}"
