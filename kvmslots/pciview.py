"""QEMU's live view of its PCI buses, parsed from ``query-pci`` or ``info pci``.

Both parsers return a :class:`PciOccupancy`: a plain ``{bus_number: {slots}}``
dict (a slot is occupied when any of its functions is present) that also
keeps every function it saw, with its ``qdev_id``, so a hot add can verify
that *its* device sits at the slot it asked for, and a reconcile can report
devices nobody told us about.

``query-pci`` is the source of truth; HMP ``info pci`` is the fallback for
QEMUs without it.  Devices behind bridges are walked in both (iteratively, and
only as deep as PCI's 256 buses allow).  Malformed output of either is a
:class:`~kvmslots.errors.MonitorError`, never a ``TypeError`` or ``RecursionError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ._shown import shown
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
        """``bb:ss.f`` in hex, without a domain, as ``lspci`` in the guest shows it."""
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
        """Record one more function QEMU reports; its slot becomes occupied on its bus."""
        self.functions.append(function)
        self.setdefault(function.bus, set()).add(function.slot)

    def without(self, qdev_ids: set[str]) -> "PciOccupancy":
        """This view with the devices of *qdev_ids* gone (their removal was confirmed)."""
        return PciOccupancy(
            (f for f in self.functions if f.qdev_id not in qdev_ids), self.peripherals and (self.peripherals - qdev_ids)
        )

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


#: PCI bus numbers are 8 bits: at most 256 buses, so at most 255 bridges nested in one another.
MAX_BUSES = 256
MAX_BUS = 255
MAX_SLOT = 31
MAX_FUNCTION = 7
MAX_ID = 0xFFFF
#: More functions than 256 buses x 32 slots x 8 functions cannot be real.
MAX_FUNCTIONS = MAX_BUSES * (MAX_SLOT + 1) * (MAX_FUNCTION + 1)

_END = object()


def parse_query_pci(reply: Any) -> PciOccupancy:
    """Parse QMP ``query-pci`` (its ``return`` value, or the whole reply).

    Whatever the reply holds, the result is a :class:`PciOccupancy` of
    well-typed functions or a :class:`MonitorError`: numbers must be ints in
    the PCI ranges, ids strings, and bridges may nest only as deep as PCI's
    256 buses allow (walked without recursion).
    """
    if isinstance(reply, Mapping) and "return" in reply:
        reply = reply["return"]
    if not isinstance(reply, list):
        raise MonitorError(f"query-pci reply is not a list of buses: {type(reply).__name__}")
    occupancy = PciOccupancy()
    for index, bus in enumerate(reply):
        if not isinstance(bus, Mapping):
            raise MonitorError(f"Unexpected query-pci reply: bus {index} is a {type(bus).__name__}, not an object")
        _walk_devices(_device_list(bus.get("devices", []), f"bus {index}"), occupancy)
    return occupancy


def _walk_devices(devices: list[Any], occupancy: PciOccupancy) -> None:
    """Add every function of one root bus, depth first in QEMU's order, without recursion."""
    stack = [iter(devices)]
    while stack:
        dev = next(stack[-1], _END)
        if dev is _END:
            stack.pop()
            continue
        function, below = _function(dev)
        occupancy.add(function)
        if len(occupancy.functions) > MAX_FUNCTIONS:
            raise MonitorError(f"Unexpected query-pci reply: more than {MAX_FUNCTIONS} PCI functions")
        if below is not None:
            if len(stack) >= MAX_BUSES:
                raise MonitorError(
                    f"Unexpected query-pci reply: bridges nested more than {MAX_BUSES - 1} deep "
                    f"(PCI has {MAX_BUSES} buses), below {function.address} {shown(function.qdev_id)}"
                )
            stack.append(iter(below))


def _device_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MonitorError(f"Unexpected query-pci reply: 'devices' of {where} is a {type(value).__name__}, not a list")
    return value


def _number(dev: Mapping[str, Any], key: str, limit: int, where: str) -> int:
    if key not in dev:
        raise MonitorError(f"Unexpected query-pci reply: {where} has no {key!r}")
    return _ranged(dev[key], key, limit, where)


def _ranged(value: Any, key: str, limit: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise MonitorError(
            f"Unexpected query-pci reply: {where}: {key!r} must be an integer 0-{limit}, got {shown(value)}"
        )
    return value


def _optional_mapping(value: Any, key: str, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MonitorError(f"Unexpected query-pci reply: {where}: {key!r} must be an object, got {shown(value)}")
    return value


def _optional_text(value: Any, key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MonitorError(f"Unexpected query-pci reply: {where}: {key!r} must be a string, got {shown(value)}")
    return value


def _function(dev: Any) -> tuple[PciFunction, list[Any] | None]:
    """One device of a query-pci reply, validated; and the devices behind it when it is a bridge."""
    if not isinstance(dev, Mapping):
        raise MonitorError(f"Unexpected query-pci reply: a device is a {type(dev).__name__}, not an object")
    where = "a device"
    bus = _number(dev, "bus", MAX_BUS, where)
    slot = _number(dev, "slot", MAX_SLOT, where)
    function = _number(dev, "function", MAX_FUNCTION, where)
    where = f"device {bus:02x}:{slot:02x}.{function}"
    ident = _optional_mapping(dev.get("id"), "id", where)
    vendor, device = (
        None if ident.get(key) is None else _ranged(ident[key], key, MAX_ID, where) for key in ("vendor", "device")
    )
    class_info = _optional_mapping(dev.get("class_info"), "class_info", where)
    bridge = dev.get("pci_bridge")
    secondary = None
    below: list[Any] | None = None
    if bridge is not None:
        bridge = _optional_mapping(bridge, "pci_bridge", where)
        numbers = _optional_mapping(bridge.get("bus"), "pci_bridge.bus", where)
        if "secondary" not in numbers:
            raise MonitorError(f"Unexpected query-pci reply: bridge {where} has no secondary bus number")
        secondary = _ranged(numbers["secondary"], "secondary", MAX_BUS, where)
        below = _device_list(bridge.get("devices") or [], f"bridge {where}")
    return (
        PciFunction(
            bus=bus,
            slot=slot,
            function=function,
            qdev_id=_optional_text(dev.get("qdev_id"), "qdev_id", where),
            vendor=vendor,
            device=device,
            description=_optional_text(class_info.get("desc"), "desc", where),
            secondary_bus=secondary,
        ),
        below,
    )


# "  Bus  0, device   3, function 0:" -- Ganeti 2.10's hv_kvm r'Bus.*device[ ]*(\d+).*' (its `info pci`
# regex), with the bus and function kept.
# ASCII only: Python's \d and \s also match other scripts' digits and spaces ('١٢' would be bus 12).
_HEADER_RE = re.compile(r"^\s*Bus\s+([0-9]+),\s*device\s+([0-9]+),\s*function\s+([0-9]+):", re.ASCII)
_ID_RE = re.compile(r'^\s*id "(.*)"\s*$', re.ASCII)
# No leading \s* before the lazy group: the two would backtrack against each other (quadratic time
# on a long line of spaces); the description is stripped instead.
_PCI_ID_RE = re.compile(r"^(.*?):\s*PCI device ([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\s*$", re.ASCII)
_SECONDARY_RE = re.compile(r"^\s*secondary bus ([0-9]+)\.?\s*$", re.ASCII)
_SECONDARY_LIKE_RE = re.compile(r"^\s*secondary bus\b", re.ASCII)


def _info_number(text: str, what: str, limit: int, line: str) -> int:
    # never int() a long text: Python refuses more than 4300 digits with a ValueError
    if len(text) > 5 or int(text) > limit:
        raise MonitorError(f"Unexpected info pci line: {what} must be 0-{limit}: {shown(line, 120)}")
    return int(text)


def _looks_like_header(line: str) -> bool:
    """A line meant as a function header that _HEADER_RE refused (string tests: linear time)."""
    words = line.split(None, 1)
    return bool(words) and words[0] == "Bus" and "device" in line and "function" in line


def parse_info_pci(text: str) -> PciOccupancy:
    """Parse HMP ``info pci`` output (the fallback where ``query-pci`` is missing).

    A function starts at its ``Bus N, device S, function F:`` header; its
    description, bridge bus numbers and ``id "..."`` follow on indented lines.
    A header or bus number that is not ASCII digits within the PCI ranges is a
    :class:`MonitorError`.
    """
    if not isinstance(text, str):
        raise MonitorError(f"info pci output must be text, got {type(text).__name__}")
    if text.lstrip().startswith("Error:"):
        raise MonitorError(f"info pci failed: {text.strip()[:500]}")
    occupancy = PciOccupancy()
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            occupancy.add(PciFunction(**current))
            if len(occupancy.functions) > MAX_FUNCTIONS:
                raise MonitorError(f"Unexpected info pci output: more than {MAX_FUNCTIONS} PCI functions")

    for line in text.splitlines():
        header = _HEADER_RE.match(line)
        if header:
            flush()
            current = {
                "bus": _info_number(header[1], "bus", MAX_BUS, line),
                "slot": _info_number(header[2], "device", MAX_SLOT, line),
                "function": _info_number(header[3], "function", MAX_FUNCTION, line),
            }
            continue
        if _looks_like_header(line):
            raise MonitorError(f"Unexpected info pci line: {shown(line, 120)}")
        if current is None:
            continue
        if m := _ID_RE.match(line):
            current["qdev_id"] = m[1]
        elif m := _PCI_ID_RE.match(line):
            current["description"] = m[1].strip()
            current["vendor"] = int(m[2], 16)
            current["device"] = int(m[3], 16)
        elif m := _SECONDARY_RE.match(line):
            current["secondary_bus"] = _info_number(m[1], "secondary bus", MAX_BUS, line)
        elif _SECONDARY_LIKE_RE.match(line):
            raise MonitorError(f"Unexpected info pci line: {shown(line, 120)}")
    flush()
    return occupancy
