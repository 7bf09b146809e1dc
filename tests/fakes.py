"""A fault-injecting stand-in for QEMU's monitor.

Only for failures that a real QEMU will not produce on demand (a connection
that drops right after ``device_add``, a device that lands at the wrong slot).
The normal paths are tested against real QEMU in ``integration/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from kvmslots.errors import MonitorConnectionLost, QemuCommandError, UnplugGuestError
from kvmslots.pciview import PciFunction, PciOccupancy


@dataclass
class FakeQemu:
    builtin: dict[int, str] = field(default_factory=lambda: {0: "", 1: "", 2: "", 3: ""})
    devices: dict[str, int] = field(default_factory=dict)  # qdev_id -> slot (bus 0)
    refuse_add: str | None = None  # QEMU error text for the next device_add
    refuse_nth_add: int | None = None  # refuse the n-th device_add (1-based) with refuse_add's text
    lose_after_add: bool = False  # add the device, then drop the connection
    lose_before_add: bool = False
    misplace_by: int = 0  # put the device this many slots off
    guest_acks: bool = True
    guest_refuses: bool = False
    connected: bool = True
    can_reconnect: bool = True
    pending: set[str] = field(default_factory=set)
    add_delay: float = 0.0  # seconds device_add takes after QEMU took the device
    refuse_del: str | None = None  # QEMU error text for device_del
    lose_during_del_wait: bool = False  # QEMU takes device_del, then the connection drops
    hidden: set[str] = field(default_factory=set)  # ids QEMU has but shows on no bus (unnumbered bridge)
    calls: list[str] = field(default_factory=list)

    def _check(self) -> None:
        if not self.connected:
            raise MonitorConnectionLost("fake: not connected")

    async def pci(self, *, placement_only: bool = False) -> PciOccupancy:
        self._check()
        view = PciOccupancy(
            (PciFunction(0, slot, 0, qdev_id) for slot, qdev_id in self.builtin.items()), peripherals=set(self.devices)
        )
        for qdev_id, slot in self.devices.items():
            if qdev_id not in self.hidden:
                view.add(PciFunction(0, slot, 0, qdev_id))
        return view

    async def device_add(self, arguments: Mapping[str, Any]) -> None:
        self._check()
        self.calls.append(f"device_add {arguments['id']}")
        if self.lose_before_add:
            self.connected = False
            raise MonitorConnectionLost("fake: lost before add")
        adds = sum(1 for c in self.calls if c.startswith("device_add"))
        if self.refuse_add and (self.refuse_nth_add is None or adds == self.refuse_nth_add):
            text, self.refuse_add = self.refuse_add, None
            raise QemuCommandError("device_add", text, "GenericError")
        slot = int(arguments["addr"], 16)
        if slot in self.builtin or slot in self.devices.values():
            raise QemuCommandError("device_add", f"PCI: slot {slot} function 0 not available for x", "GenericError")
        self.devices[arguments["id"]] = slot + self.misplace_by
        if self.add_delay:
            import asyncio

            await asyncio.sleep(self.add_delay)
        if self.lose_after_add:
            self.lose_after_add = False
            self.connected = False
            raise MonitorConnectionLost("fake: lost after add")

    async def device_del(self, qdev_id: str, timeout: float, on_sent=None, *, also=()) -> bool:
        self._check()
        self.calls.append(f"device_del {qdev_id}")
        if qdev_id not in self.devices:
            raise QemuCommandError("device_del", f"Device '{qdev_id}' not found", "DeviceNotFound")
        if self.refuse_del:
            raise QemuCommandError("device_del", self.refuse_del, "GenericError")
        if on_sent is not None:
            on_sent(qdev_id in self.pending)
        if self.lose_during_del_wait:
            self.connected = False
            raise MonitorConnectionLost("fake: lost while waiting for DEVICE_DELETED")
        if self.guest_refuses:
            raise UnplugGuestError(qdev_id, "fake refusal")
        if not self.guest_acks:
            self.pending.add(qdev_id)
            return False
        del self.devices[qdev_id]
        return True

    def eject(self, qdev_id: str) -> None:
        """Play the guest's late eject of a pending unplug."""
        self.pending.discard(qdev_id)
        del self.devices[qdev_id]


@dataclass
class ReconnectingFakeQemu(FakeQemu):
    async def reconnect(self) -> None:
        if not self.can_reconnect:
            raise MonitorConnectionLost("fake: reconnect failed")
        self.connected = True


class Q35Fake:
    """A q35 VM's monitor for fault injection: root ports ``{id: (slot, function, chassis)}``, devices
    ``{qdev_id: (bus, slot, function)}``; a port's bus number is its chassis, or 0 when not numbered."""

    def __init__(self, ports: dict[str, tuple[int, int, int]], numbered: bool = True) -> None:
        self.ports = ports
        self.numbered = numbered
        self.devices: dict[str, tuple[str, int, int]] = {}
        self.placement_view = None
        self.bus_hotplug: dict[str, str | None] = {}
        self.capabilities = None
        self.fail_view_after_add = False

    def _number(self, bus: str) -> int:
        return 0 if bus == "pcie.0" else (self.ports[bus][2] if self.numbered else 0)

    async def pci(self, *, placement_only: bool = False) -> PciOccupancy:
        functions = [PciFunction(0, 0, 0, "", 0x8086, 0x29C0, "Host bridge"),
                     PciFunction(0, 1, 0, "", 0x1234, 0x1111, "VGA"),
                     PciFunction(0, 0x1F, 0, "", 0x8086, 0x2918, "ISA bridge")]
        for pid, (slot, function, _) in self.ports.items():
            functions.append(PciFunction(0, slot, function, pid, 0x1B36, 0x000C, "PCI bridge", self._number(pid)))
        for qid, (bus, slot, function) in self.devices.items():
            number = self._number(bus)
            if bus == "pcie.0" or number:
                functions.append(PciFunction(number, slot, function, qid))
        return PciOccupancy(functions, None if placement_only else set(self.devices) | set(self.ports))

    async def device_add(self, arguments: Mapping[str, Any]) -> None:
        bus, (slot, _, function) = arguments["bus"], str(arguments["addr"]).partition(".")
        place = (bus, int(slot, 16), int(function or 0))
        for qid, held in self.devices.items():
            if held == place:
                raise QemuCommandError(
                    "device_add",
                    f"PCI: slot {place[1]} function {place[2]} not available for x, in use by {qid}",
                    "GenericError",
                )
        self.devices[arguments["id"]] = place

    async def device_add_and_view(self, arguments: Mapping[str, Any]) -> PciOccupancy:
        await self.device_add(arguments)
        if self.fail_view_after_add:
            from kvmslots.errors import MonitorError

            raise MonitorError("fake: QEMU took the device_add but then refused query-pci")
        return await self.pci(placement_only=True)

    async def device_del(self, qdev_id: str, timeout: float, on_sent=None, *, also=()) -> bool:
        if qdev_id not in self.devices:
            raise QemuCommandError("device_del", f"Device '{qdev_id}' not found", "DeviceNotFound")
        if on_sent is not None:
            on_sent(False)
        bus, slot, _ = self.devices[qdev_id]
        for qid in [q for q, (b, s, _) in self.devices.items() if (b, s) == (bus, slot)]:
            del self.devices[qid]  # QEMU unplugs a slot whole
        return True
