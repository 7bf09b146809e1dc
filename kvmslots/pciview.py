"""QEMU's live view of its PCI buses, parsed from ``query-pci`` or ``info pci``.

Both parsers return a :class:`PciOccupancy`: a plain ``{bus_number: {slots}}``
dict (a slot is occupied when any of its functions is present) that also
keeps every function it saw, with its ``qdev_id``, so a hot add can verify
that *its* device sits at the slot it asked for, and a reconcile can report
devices nobody told us about.

``query-pci`` is the source of truth; HMP ``info pci`` is the fallback for
QEMUs without it.  Devices behind bridges are walked recursively in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import InvalidBus, MonitorError

__all__ = ["PciFunction", "PciOccupancy", "parse_query_pci", "parse_info_pci", "ROOT_BUS_NAMES", "PCIE_PORT_IDS"]

#: Names QEMU gives the root bus (bus number 0) of its machines.
ROOT_BUS_NAMES = frozenset({"pci.0", "pcie.0"})
#: (vendor, device) of QEMU's PCIe ports (pcie-root-port, ioh3420, xio3130-downstream): the link
#: below a port has one slot, 0; QEMU accepts others but the guest never sees them.
PCIE_PORT_IDS = frozenset({(0x1B36, 0x000C), (0x8086, 0x3420), (0x104C, 0x8233)})


@dataclass(frozen=True)
class PciFunction:
    """One PCI function QEMU reports."""

    bus: int
    slot: int
    function: int
    qdev_id: str = ""
    vendor: int | None = None
    device: int | None = None
    description: str = ""
    secondary_bus: int | None = None  # set for bridges

    @property
    def address(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


class PciOccupancy(dict[int, set[int]]):
    """``{bus_number: set_of_occupied_slots}`` plus the functions behind it."""

    def __init__(self, functions: Iterable[PciFunction] = (), peripherals: Iterable[str] | None = None) -> None:
        super().__init__()
        self.functions: list[PciFunction] = []
        #: ids of every device QEMU has (``qom-list /machine/peripheral``), placed on a bus or not;
        #: None when unknown.  query-pci omits devices behind bridges the firmware has not numbered.
        self.peripherals: frozenset[str] | None = None if peripherals is None else frozenset(peripherals)
        for function in functions:
            self.add(function)

    def add(self, function: PciFunction) -> None:
        self.functions.append(function)
        self.setdefault(function.bus, set()).add(function.slot)

    def slots(self, bus: int) -> set[int]:
        """Occupied slots of bus number *bus* (empty for an unknown bus)."""
        return set(self.get(bus, ()))

    def find(self, qdev_id: str) -> PciFunction | None:
        """The function with that qdev id (function 0 first), if QEMU shows it."""
        if not qdev_id:
            return None
        matches = [f for f in self.functions if f.qdev_id == qdev_id]
        return min(matches, key=lambda f: f.function) if matches else None

    def has(self, qdev_id: str) -> bool:
        """Does QEMU have this device at all?  Absence here is what confirms a removal."""
        return self.find(qdev_id) is not None or (self.peripherals is not None and qdev_id in self.peripherals)

    def at(self, bus: int, slot: int) -> list[PciFunction]:
        """Functions present at one slot."""
        return [f for f in self.functions if f.bus == bus and f.slot == slot]

    def is_pcie_port(self, bus_name: str) -> bool:
        """Is *bus_name* the link below a PCIe port (only slot 0 usable)?"""
        return any(
            f.qdev_id == bus_name and f.secondary_bus is not None and (f.vendor, f.device) in PCIE_PORT_IDS
            for f in self.functions
        )

    def bus_number(self, bus_name: str) -> int:
        """Map a QEMU bus id (``pci.0``, a bridge's id) to its bus number."""
        if bus_name in ROOT_BUS_NAMES:
            return 0
        for function in self.functions:
            if function.qdev_id == bus_name and function.secondary_bus is not None:
                if function.secondary_bus == 0:
                    raise MonitorError(
                        f"Bridge {bus_name!r} has no bus number yet (the firmware has not run); "
                        "its slots cannot be checked"
                    )
                return function.secondary_bus
        raise InvalidBus(f"QEMU has no PCI bus named {bus_name!r}")


def parse_query_pci(reply: Any) -> PciOccupancy:
    """Parse QMP ``query-pci`` (its ``return`` value, or the whole reply)."""
    if isinstance(reply, Mapping) and "return" in reply:
        reply = reply["return"]
    if not isinstance(reply, list):
        raise MonitorError(f"query-pci reply is not a list of buses: {type(reply).__name__}")
    occupancy = PciOccupancy()
    try:
        for bus in reply:
            _walk_devices(bus.get("devices", []), occupancy)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MonitorError(f"Unexpected query-pci reply: {exc!r}") from None
    return occupancy


def _walk_devices(devices: list[Mapping[str, Any]], occupancy: PciOccupancy) -> None:
    for dev in devices:
        ident = dev.get("id") or {}
        bridge = dev.get("pci_bridge")
        secondary = None
        if bridge is not None:
            secondary = int(bridge["bus"]["secondary"])
        occupancy.add(
            PciFunction(
                bus=int(dev["bus"]),
                slot=int(dev["slot"]),
                function=int(dev["function"]),
                qdev_id=str(dev.get("qdev_id") or ""),
                vendor=ident.get("vendor"),
                device=ident.get("device"),
                description=str((dev.get("class_info") or {}).get("desc") or ""),
                secondary_bus=secondary,
            )
        )
        if bridge is not None:
            _walk_devices(bridge.get("devices") or [], occupancy)


# "  Bus  0, device   3, function 0:" -- the seed's r'Bus.*device[ ]*(\d+).*', with the bus and function kept.
_HEADER_RE = re.compile(r"^\s*Bus\s+(\d+),\s*device\s+(\d+),\s*function\s+(\d+):")
_ID_RE = re.compile(r'^\s*id "(.*)"\s*$')
_PCI_ID_RE = re.compile(r"^\s*(.*?):\s*PCI device ([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\s*$")
_SECONDARY_RE = re.compile(r"^\s*secondary bus (\d+)\.?\s*$")


def parse_info_pci(text: str) -> PciOccupancy:
    """Parse HMP ``info pci`` output (the fallback where ``query-pci`` is missing).

    A function starts at its ``Bus N, device S, function F:`` header; its
    description, bridge bus numbers and ``id "..."`` follow on indented lines.
    """
    if not isinstance(text, str):
        raise MonitorError(f"info pci output must be text, got {type(text).__name__}")
    if text.lstrip().startswith("Error:"):
        raise MonitorError(f"info pci failed: {text.strip()}")
    occupancy = PciOccupancy()
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            occupancy.add(PciFunction(**current))

    for line in text.splitlines():
        header = _HEADER_RE.match(line)
        if header:
            flush()
            current = {"bus": int(header[1]), "slot": int(header[2]), "function": int(header[3])}
            continue
        if current is None:
            continue
        if m := _ID_RE.match(line):
            current["qdev_id"] = m[1]
        elif m := _PCI_ID_RE.match(line):
            current["description"] = m[1].strip()
            current["vendor"] = int(m[2], 16)
            current["device"] = int(m[3], 16)
        elif m := _SECONDARY_RE.match(line):
            current["secondary_bus"] = int(m[1])
    flush()
    return occupancy
