"""What the QEMU at the other end can do, asked once per connection, checked before anything is reserved.

A hot add that QEMU cannot perform used to be found out by reserving a slot,
sending ``device_add`` and undoing.  Here the facts are read up front and
kept on the monitor for the life of its connection:

- the version, from the QMP greeting, else ``query-version``, else HMP
  ``info version`` (where only HMP answers; parsed as Ganeti 2.10's hv_kvm does);
- the commands (``query-commands``): ``device_add``/``device_del`` must exist;
- the machine type (``qom-get /machine type``: ``pc-q35-7.2-machine``), which
  must be the one the VM was planned for (an unversioned plan, ``pc`` or
  ``q35``, accepts any version of its family);
- per bus, whether it takes hotplug: QEMU gives every bus a
  ``hotplug-handler`` link, empty when nothing can hot-plug there (ACPI
  hotplug off on ``pci.0``, a bridge with ``shpc=off`` and no ACPI bridge
  hotplug, ``pcie.0`` itself); a ``pcie-root-port`` with ``hotplug=off`` keeps
  a handler under native PCIe hotplug, so its own property is read too.

Each refusal is a :class:`~kvmslots.errors.QemuIncompatible` that says what
and why.  Binary-side facts (the machine types a QEMU binary offers) come
from ``qemu-system-x86_64 -machine help`` for planning without a VM.
"""

from __future__ import annotations

import asyncio
import functools
import re
import subprocess
from dataclasses import dataclass

from .errors import (
    MachineMismatch,
    QemuCommandError,
    QemuCommandMissing,
    QemuTooOld,
    UnsupportedMachine,
)
from .model import Machine, VMSpec, machine_family
from .monitor import GreetsWithVersion, KeepsConnectionFacts, MonitorLike, RunsQmp
from .pciview import PciOccupancy
from .topology import NO_HOTPLUG_PCIE_ROOT

__all__ = [
    "MIN_QEMU_VERSION",
    "QemuCapabilities",
    "probe",
    "check_qemu",
    "check_capabilities",
    "hotplug_support",
    "known_support",
    "check_machine_available",
    "binary_machines",
    "parse_info_version",
    "parse_machine_help",
]

#: The oldest QEMU kvmslots is tested against (Debian 12's); older ones are refused.
MIN_QEMU_VERSION = (7, 2, 0)
REQUIRED_COMMANDS = ("device_add", "device_del")
#: Ganeti 2.10's hv_kvm HMP version parse: ``info version`` prints ``7.2.22Debian 1:7.2+dfsg...``
#: (older: ``QEMU 2.5.0``).
_INFO_VERSION_RE = re.compile(r"^\s*(?:QEMU\s+)?([0-9]{1,5})\.([0-9]{1,5})\.([0-9]{1,5})(?![0-9])", re.ASCII)
_ROOT_PATHS = {Machine.I440FX: "/machine/i440fx/pci.0", Machine.Q35: "/machine/q35/pcie.0"}


@dataclass(frozen=True)
class QemuCapabilities:
    """Facts about one QEMU, as read over one QMP connection."""

    version: tuple[int, int, int]
    commands: frozenset[str]
    machine: str | None  # the resolved machine type, e.g. "pc-q35-7.2"; None if QEMU would not say

    @property
    def version_text(self) -> str:
        """The version as dotted text (``7.2.0``), as messages show it."""
        return ".".join(map(str, self.version))


def parse_info_version(text: object) -> tuple[int, int, int] | None:
    """``(7, 2, 22)`` from HMP ``info version`` output, or None if it is not one."""
    if not isinstance(text, str):
        return None
    match = _INFO_VERSION_RE.match(text)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


async def probe(monitor: MonitorLike) -> QemuCapabilities | None:
    """The connection's :class:`QemuCapabilities`, read once and kept on the monitor.

    None for a monitor that cannot run arbitrary commands (a fault-injecting
    stand-in in tests).
    """
    if isinstance(monitor, KeepsConnectionFacts) and isinstance(monitor.capabilities, QemuCapabilities):
        return monitor.capabilities
    if not isinstance(monitor, RunsQmp):
        return None
    version = monitor.greeting_version if isinstance(monitor, GreetsWithVersion) else None
    if version is None:
        version = await _version(monitor)
    replies = await monitor.execute("query-commands")
    commands = frozenset(str(c.get("name")) for c in replies if isinstance(c, dict))
    machine: str | None
    try:
        qom_type = await monitor.execute("qom-get", {"path": "/machine", "property": "type"})
        machine = qom_type.removesuffix("-machine") if isinstance(qom_type, str) else None
    except QemuCommandError:
        machine = None
    caps = QemuCapabilities(version, commands, machine)
    if isinstance(monitor, KeepsConnectionFacts):
        monitor.capabilities = caps
    return caps


async def _version(monitor: RunsQmp) -> tuple[int, int, int]:
    try:
        reply = await monitor.execute("query-version")
        qemu = reply["qemu"]
        return (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
    except QemuCommandError as exc:
        if exc.error_class != "CommandNotFound":
            raise
    except (KeyError, TypeError, ValueError):
        pass
    text = await monitor.execute("human-monitor-command", {"command-line": "info version"})
    version = parse_info_version(text)
    if version is None:
        raise QemuCommandError("info version", f"unexpected output {str(text)[:80]!r}")
    return version


def check_capabilities(caps: QemuCapabilities, vm: VMSpec) -> None:
    """Refuse a QEMU too old for kvmslots, without ``device_add``/``device_del``, or running
    another machine type than *vm* was planned for."""
    if caps.version < MIN_QEMU_VERSION:
        raise QemuTooOld(caps.version, MIN_QEMU_VERSION)
    for command in REQUIRED_COMMANDS:
        if command not in caps.commands:
            raise QemuCommandMissing(command)
    if caps.machine is not None and not same_machine(vm.machine, caps.machine):
        raise MachineMismatch(vm.name, vm.machine, caps.machine)


def same_machine(planned: str, running: str) -> bool:
    """Is *running* (a resolved name) the machine *planned* asked for?  ``pc``/``q35`` match any
    version of their family; a versioned name only itself."""
    try:
        family = machine_family(running)
    except UnsupportedMachine:
        return False
    if planned in ("pc", "q35"):
        return machine_family(planned) is family
    return planned == running


async def check_qemu(monitor: MonitorLike, vm: VMSpec) -> QemuCapabilities | None:
    """Refuse a QEMU that is too old, lacks ``device_add``/``device_del`` or runs another machine type."""
    caps = await probe(monitor)
    if caps is not None:
        check_capabilities(caps, vm)
    return caps


async def hotplug_support(monitor: MonitorLike, vm: VMSpec, view: PciOccupancy) -> dict[str, str | None]:
    """``{bus: None, or why it takes no hotplug}`` for the root bus and every bridge or port in *view*.

    Answers are kept on the monitor for its connection (a bus's hotplug
    handler is fixed when QEMU creates it).
    """
    if not isinstance(monitor, RunsQmp):
        return {}
    known: dict[str, str | None] = monitor.bus_hotplug if isinstance(monitor, KeepsConnectionFacts) else {}
    wanted = [vm.root_bus, *_view_buses(view)]
    missing = [bus for bus in wanted if bus not in known]
    if missing:
        answers = await asyncio.gather(*(_bus_hotplug(monitor, vm, bus) for bus in missing))
        known.update(zip(missing, answers))
    return {bus: known[bus] for bus in wanted}


def known_support(monitor: MonitorLike, view: PciOccupancy) -> dict[str, str | None] | None:
    """The answers kept on this connection when they already cover every bus in *view* (no I/O),
    else None: then :func:`hotplug_support` must ask QEMU."""
    known = monitor.bus_hotplug if isinstance(monitor, KeepsConnectionFacts) else None
    if not known or any(bus not in known for bus in _view_buses(view)):
        return None
    return dict(known)


def _view_buses(view: PciOccupancy) -> list[str]:
    """Ids of the bridges and ports QEMU shows (the buses behind them are named after them)."""
    return [f.qdev_id for f in view.functions if f.secondary_bus is not None and f.qdev_id]


async def _bus_hotplug(monitor: RunsQmp, vm: VMSpec, bus: str) -> str | None:
    """None when QEMU can hot-plug on *bus*, else why not."""
    root = bus == vm.root_bus
    path = _ROOT_PATHS[vm.family] if root else f"/machine/peripheral/{bus}/{bus}"
    try:
        handler = await monitor.execute("qom-get", {"path": path, "property": "hotplug-handler"})
    except QemuCommandError as exc:
        return f"QEMU cannot tell whether {bus} takes hotplug ({exc.qemu_message})"
    if not handler:
        if root and vm.family is Machine.I440FX:
            return "ACPI PCI hotplug is off on pci.0 (PIIX4_PM.acpi-root-pci-hotplug=off)"
        if root:
            return NO_HOTPLUG_PCIE_ROOT
        return (
            f"no hotplug controller serves {bus} (a pci-bridge with shpc=off and ACPI bridge hotplug off, "
            "or a port with hotplug=off)"
        )
    if not root:
        try:
            enabled = await monitor.execute("qom-get", {"path": f"/machine/peripheral/{bus}", "property": "hotplug"})
        except QemuCommandError:
            enabled = True  # not a root port: bridges have no such property
        if enabled is False:
            return f"the pcie-root-port {bus} has hotplug=off"
    return None


# --------------------------------------------------------------------------- the binary


def parse_machine_help(text: str) -> dict[str, str]:
    """``{name: resolved name}`` from ``-machine help``: ``pc -> pc-i440fx-7.2``, ``pc-q35-7.2 -> itself``."""
    machines: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        parts = line.split(None, 1)
        if not parts:
            continue
        name = parts[0]
        alias = re.search(r"\(alias of ([A-Za-z0-9_.-]+)\)", line)
        machines[name] = alias[1] if alias else name
    return machines


@functools.lru_cache(maxsize=8)
def binary_machines(binary: str) -> dict[str, str]:
    """The machine types *binary* offers (``-machine help``), cached per binary path."""
    try:
        result = subprocess.run(
            [binary, "-machine", "help"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise UnsupportedMachine(f"Cannot ask {binary} for its machine types: {exc}", None) from exc
    return parse_machine_help(result.stdout)


def check_machine_available(machine: str, binary: str) -> str:
    """*machine* if the QEMU *binary* has it (its resolved name otherwise unused); :class:`UnsupportedMachine`
    if not."""
    family = machine_family(machine)
    known = binary_machines(binary)
    if machine not in known:
        supported = (n for n in known if _is_supported(n))
        offered = tuple(sorted(supported, key=lambda n: (machine_family(n) is not family, n)))
        raise UnsupportedMachine(
            f"{binary} has no machine type {machine!r}; it offers {', '.join(offered[:8])}"
            + (", ..." if len(offered) > 8 else ""),
            machine,
            offered,
        )
    return machine


def _is_supported(name: str) -> bool:
    try:
        machine_family(name)
    except UnsupportedMachine:
        return False
    return True
