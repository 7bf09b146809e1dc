"""The exception tree of kvmslots.

Every error the package raises derives from :class:`KvmSlotsError`, so a
lifecycle manager can catch one class and still tell the cases apart by
subclass.  Errors that come from QEMU carry QEMU's own message in
``qemu_message`` (and its error class in ``error_class``) so the operator sees
what QEMU said, not only our interpretation of it.

Validation errors also derive from :class:`ValueError`, because they are what
a caller expects from a function handed a bad argument.

Every error carries the facts of its case as attributes (:data:`FACTS`: ``vm``,
``uuid``, ``device_id``, ``bus``, ``slot``, ``state``, ``new_state``,
``qemu_message``, ``left``; None when they do not apply), and
:meth:`KvmSlotsError.facts` gives them all; ``kvmslots --json`` prints them
on a failure.  The hierarchy::

    KvmSlotsError
      ValidationError  (also ValueError)
        InvalidMask
        InvalidSlot
        InvalidDeviceId
        InvalidUUID
        InvalidDeviceType
        InvalidName
        InvalidBus
        InvalidDriver
        InvalidProperty
        InvalidTimeout
        InvalidFunction
        UnsupportedMachine
        InvalidPciAddress  (also PciError)
        InvalidDeviceSpec  (also PciError)
          PciDeviceInvalidPFRemoteManaged
        InvalidAlias  (also PciError)
        AliasNotDefined  (also PciError)
        InvalidPciRequest  (also PciError)
        InvalidDevicesJson  (also PciError)
      SlotError
        SlotsExhausted
          NoHotplugPort
        SlotOccupied
          SlotReserved
      StateError
        UnknownVM  (also LookupError)
        UnknownDevice  (also LookupError)
        DeviceExists
        StateConflict
          InvalidTransition
        StateImportError  (also ValidationError)
          GanetiRuntimeError
        VMBusy
        StateCorrupt
        StoreUnavailable
        InvalidStateLocation  (also ValidationError)
        UnknownHost  (also LookupError)
      MonitorError
        MonitorUnavailable
        MonitorConnectionLost
          MonitorTimeout
        QemuCommandError
      HotplugError
        DeviceAddFailed
          VerificationFailed
        UnplugGuestError
        QemuIncompatible
          QemuTooOld
          QemuCommandMissing
          BusNotHotpluggable
          MachineMismatch
      PciError
        PciDeviceInvalidStatus
        PciDeviceInvalidOwner
        PciDeviceRequestFailed
        UnknownPciDevice  (also LookupError)
        DiscoveryError
        HostBindError
          IommuGroupNotViable
      MigrationError
        MigrationRefused
        MigrationIncomplete
        MigrationMismatch
      TestVMError
        GuestFilesMissing
        GuestBootTimeout
        GuestBuildFailed

A class listed under two parents (``also``) can be caught as either.
"""

from __future__ import annotations

from typing import Any, Self

__all__ = [
    "FACTS",
    "KvmSlotsError",
    "ValidationError",
    "InvalidMask",
    "InvalidSlot",
    "InvalidDeviceId",
    "InvalidUUID",
    "InvalidDeviceType",
    "InvalidName",
    "InvalidBus",
    "InvalidDriver",
    "InvalidProperty",
    "InvalidTimeout",
    "SlotError",
    "SlotsExhausted",
    "SlotOccupied",
    "SlotReserved",
    "NoHotplugPort",
    "InvalidFunction",
    "UnsupportedMachine",
    "StateError",
    "UnknownVM",
    "UnknownDevice",
    "DeviceExists",
    "StateConflict",
    "InvalidTransition",
    "StateImportError",
    "GanetiRuntimeError",
    "VMBusy",
    "StateCorrupt",
    "StoreUnavailable",
    "InvalidStateLocation",
    "UnknownHost",
    "MonitorError",
    "MonitorUnavailable",
    "MonitorConnectionLost",
    "MonitorTimeout",
    "QemuCommandError",
    "HotplugError",
    "DeviceAddFailed",
    "VerificationFailed",
    "UnplugGuestError",
    "QemuIncompatible",
    "QemuTooOld",
    "QemuCommandMissing",
    "BusNotHotpluggable",
    "MachineMismatch",
    "PciError",
    "InvalidPciAddress",
    "InvalidDeviceSpec",
    "PciDeviceInvalidPFRemoteManaged",
    "InvalidAlias",
    "AliasNotDefined",
    "InvalidPciRequest",
    "InvalidDevicesJson",
    "PciDeviceInvalidStatus",
    "PciDeviceInvalidOwner",
    "PciDeviceRequestFailed",
    "UnknownPciDevice",
    "DiscoveryError",
    "HostBindError",
    "IommuGroupNotViable",
    "MigrationError",
    "MigrationRefused",
    "MigrationIncomplete",
    "MigrationMismatch",
    "TestVMError",
    "GuestFilesMissing",
    "GuestBootTimeout",
    "GuestBuildFailed",
]


#: The facts an error may carry, as attributes (None when they do not apply or are not known).
FACTS = ("vm", "uuid", "device_id", "bus", "slot", "state", "new_state", "qemu_message", "left")


class KvmSlotsError(Exception):
    """Root of every error raised by kvmslots.

    Every error carries the facts of its case as attributes, so a program
    branches on data, not on the message: ``vm``, ``uuid`` and ``device_id``
    (the QEMU id) of the device, ``bus`` and ``slot``, ``state`` (the device
    state before) and ``new_state`` (after), ``qemu_message`` (QEMU's own
    words), and for a failed hot add ``left``: what it left behind, a mapping
    of QEMU id to the state its record is left in (empty: nothing).  A fact
    that does not apply is None.  Subclasses add their own (``path``,
    ``location``, ``timeout``, ...).
    """

    vm: str | None = None
    uuid: str | None = None
    device_id: str | None = None
    bus: str | None = None
    slot: int | None = None
    state: str | None = None
    new_state: str | None = None
    qemu_message: str | None = None
    left: dict[str, str] | None = None

    def __init__(self, *args: object, **facts: object) -> None:
        super().__init__(*args)
        self.add_facts(**facts)

    def add_facts(self, **facts: object) -> Self:
        """Set facts (only those in :data:`FACTS`; None leaves a fact as it was); returns the error."""
        for name, value in facts.items():
            if name not in FACTS:
                raise TypeError(f"{type(self).__name__} has no fact {name!r}")
            if value is not None:
                setattr(self, name, value)
        return self

    def facts(self) -> dict[str, object]:
        """Every fact this error knows, and its subclass's own attributes."""
        known = {name: getattr(self, name) for name in FACTS if getattr(self, name) is not None}
        known.update({k: v for k, v in vars(self).items() if not k.startswith("_") and v is not None})
        return known


# --- bad input -------------------------------------------------------------

class ValidationError(KvmSlotsError, ValueError):
    """An argument or a stored document is malformed; nothing was changed."""


class InvalidMask(ValidationError):
    """A reservation mask is not 32 characters of '0' and '1'."""


class InvalidSlot(ValidationError):
    """A slot number is not an integer in 0..31."""


class InvalidDeviceId(ValidationError):
    """A text is not a ``<type>-<uuid8>-pci-<slot>`` device id."""


class InvalidUUID(ValidationError):
    """A device UUID is not a canonical RFC 4122 UUID."""


class InvalidDeviceType(ValidationError):
    """A device type is not ``[a-z][a-z0-9]*`` (it becomes part of a QEMU id)."""


class InvalidName(ValidationError):
    """A VM name is empty, too long or has characters unsafe in paths and ids."""


class InvalidBus(ValidationError):
    """A PCI bus name is not a QEMU bus id."""


class InvalidDriver(ValidationError):
    """A QEMU device driver (model) name is malformed."""


class InvalidProperty(ValidationError):
    """An extra QEMU device property has a bad name or value."""


class InvalidFunction(ValidationError):
    """A PCI function number is not 0-7, or a multifunction group is malformed."""


class UnsupportedMachine(ValidationError):
    """The machine type is not one kvmslots places devices on, or this QEMU does not have it.

    ``machine`` is the name asked for; ``known`` the names QEMU offers, when
    they were asked for (empty otherwise).
    """

    def __init__(self, message: str, machine: object, known: tuple[str, ...] = ()) -> None:
        self.machine = machine
        self.known = known
        super().__init__(message)


class InvalidTimeout(ValidationError):
    """A timeout is not a finite number of seconds within the accepted range."""


# --- slots -----------------------------------------------------------------

class SlotError(KvmSlotsError):
    """A slot cannot be handed out."""


class SlotsExhausted(SlotError):
    """Every slot of the bus (or of every bus that could take the device) is taken.

    ``bus`` is the bus, or None when several were tried; ``hint`` says what
    would make room (a spare bridge, more hotplug ports), when something would.
    """

    def __init__(self, bus: str | None = None, hint: str | None = None, *, vm: str | None = None) -> None:
        self.hint = hint
        where = f" on bus {bus}" if bus else ""
        text = f"All PCI slots occupied{where}"
        if vm:
            text = f"VM {vm!r}: {text[0].lower()}{text[1:]}"
        super().__init__(text + (f"; {hint}" if hint else ""), bus=bus, vm=vm)


class NoHotplugPort(SlotsExhausted):
    """A q35 VM has no free ``pcie-root-port`` left for a hot add.

    Ports can only be added at boot (``pcie.0`` takes no hotplug): plan the VM
    with more ``hotplug_ports`` (``--hotplug-ports``) and restart it.
    """

    def __init__(self, vm: str, ports: int) -> None:
        self.ports = ports
        super().__init__(
            None,
            f"all {ports} pcie-root-port(s) hold a device; plan the VM with more --hotplug-ports "
            "(hotplug_ports) and boot it again",
            vm=vm,
        )


class SlotOccupied(SlotError):
    """The slot is already held (by one of our devices or one QEMU shows)."""

    def __init__(self, slot: int, holder: str | None = None, bus: str | None = None, *, vm: str | None = None) -> None:
        self.holder = holder
        text = f"Slot {slot} occupied"
        if bus:
            text += f" on bus {bus}"
        if holder:
            text += f" by {holder}"
        super().__init__(text, slot=slot, bus=bus, vm=vm)


class SlotReserved(SlotOccupied):
    """The slot is reserved by the VM's mask and is never handed out."""

    def __init__(self, slot: int, bus: str | None = None) -> None:
        super().__init__(slot, "the reservation mask", bus)


# --- stored state ----------------------------------------------------------

class StateError(KvmSlotsError):
    """The stored runtime state does not allow the operation."""


class UnknownVM(StateError, LookupError):
    """No VM of that name is stored; the message says what to run (``plan`` or ``adopt``)."""

    def __init__(self, vm: str) -> None:
        super().__init__(
            f"No VM named {vm!r} in the state store: run 'kvmslots plan {vm} ...' before booting it, or "
            f"'kvmslots adopt {vm} --qmp SOCKET' to take over a VM that is already running",
            vm=vm,
        )


class UnknownDevice(StateError, LookupError):
    """The VM has no device with that UUID."""


class DeviceExists(StateError):
    """A device with that UUID (or the same uuid8) already belongs to the VM."""


class StateConflict(StateError):
    """The request contradicts what is stored (e.g. a different slot)."""


class InvalidTransition(StateConflict):
    """A device state change the guest-device state machine does not allow (see ``model.TRANSITIONS``)."""

    def __init__(self, vm: str, uuid: str, state: str, target: str) -> None:
        self.target = target
        super().__init__(
            f"Device {uuid} of VM {vm!r} cannot go from {state!r} to {target!r}", vm=vm, uuid=uuid, state=state
        )


class VMBusy(StateError):
    """Another operation holds the VM's lock for longer than we were willing to wait."""


class StateCorrupt(StateError):
    """The state file exists but is empty, truncated or not a kvmslots database.

    Never taken for a new store: that would silently forget every slot
    assignment.  ``path`` is the file; restore it from a backup, or move it
    away to start from nothing on purpose.
    """

    def __init__(self, message: str, path: str) -> None:
        self.path = path
        super().__init__(message)


class StoreUnavailable(StateError):
    """The state database cannot be reached (a PostgreSQL server down, refused, or gone mid-transaction).

    ``location`` is where we tried (a URL without its password).  Whatever
    the interrupted transaction wrote was rolled back by the server; kvmslots
    never falls back to another store.
    """

    def __init__(self, message: str, location: str) -> None:
        self.location = location
        super().__init__(message)


class InvalidStateLocation(StateError, ValidationError):
    """A state location that looks like a URL but is not a ``postgresql://`` one.

    Refused rather than taken for a directory name: a mistyped URL must not
    quietly become a new, empty SQLite state.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(
            f"State location {location!r} looks like a URL but is not postgresql://...; give a directory for a "
            "SQLite state, or postgresql://[user@]host/db (or postgresql:///db?host=/socket/dir)"
        )


class UnknownHost(StateError, LookupError):
    """No host of that name has devices in the (cluster) inventory."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(f"No host named {host!r} in the device inventory")


class StateImportError(StateError, ValidationError):
    """An exported runtime document is corrupted, foreign or of another version."""


class GanetiRuntimeError(StateImportError):
    """A Ganeti KVM runtime file cannot be taken over: unreadable, malformed, or inconsistent
    (two devices at one slot, an id that does not name its device, a slot Ganeti reserves).

    Raised before anything is written.  ``path`` is the runtime file (``<text>`` when it was
    handed over as text); ``ids`` the QEMU ids the problem is about, when it is about ids; the
    usual facts (``vm``, ``uuid``, ``device_id``, ``bus``, ``slot``) where one device is at fault.
    """

    def __init__(self, message: str, path: str, ids: tuple[str, ...] = (), **facts: object) -> None:
        self.path = path
        self.ids = tuple(ids)
        super().__init__(message, **facts)


# --- QEMU monitor ------------------------------------------------------------

class MonitorError(KvmSlotsError):
    """Talking to QEMU's QMP monitor failed."""


class MonitorUnavailable(MonitorError):
    """The QMP socket could not be connected to (after retrying)."""


class MonitorConnectionLost(MonitorError):
    """The QMP connection dropped in the middle of an operation.

    Whatever was sent last may or may not have reached QEMU: records are left
    for :func:`~kvmslots.hotplug.reconcile`.  ``address`` is the socket and
    ``command`` the QMP command (or wait) that was under way, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        address: str | None = None,
        command: str | None = None,
        vm: str | None = None,
        device_id: str | None = None,
    ) -> None:
        self.address = address
        self.command = command
        self.vm = vm
        self.device_id = device_id
        super().__init__(message)


class MonitorTimeout(MonitorConnectionLost):
    """QEMU did not answer a command within ``timeout`` seconds (a wedged or stopped QEMU).

    kvmslots closes the connection after a timeout (a late answer would be out
    of step with the next command), so this is a lost connection too.
    """

    def __init__(self, message: str, *, address: str, command: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(message, address=address, command=command)


class QemuCommandError(MonitorError):
    """QEMU answered a command with an error; ``qemu_message`` is its text."""

    qemu_message: str

    def __init__(self, command: str, qemu_message: str, error_class: str | None = None) -> None:
        self.command = command
        self.qemu_message = qemu_message
        self.error_class = error_class
        super().__init__(f"{command} failed: {qemu_message}")


# --- hotplug -----------------------------------------------------------------

class HotplugError(KvmSlotsError):
    """A hot add or hot remove did not complete; the state was rolled back."""

    def __init__(self, message: str, qemu_message: str | None = None, **facts: object) -> None:
        super().__init__(message, qemu_message=qemu_message, **facts)


class DeviceAddFailed(HotplugError):
    """``device_add`` failed or its result could not be confirmed; ``left`` says what stayed recorded."""

    def __init__(self, message: str, qemu_message: str | None = None, **facts: object) -> None:
        super().__init__(message if not qemu_message else f"{message}: {qemu_message}", qemu_message, **facts)


class VerificationFailed(DeviceAddFailed):
    """QEMU accepted ``device_add`` but ``query-pci`` does not show the device where asked."""


class UnplugGuestError(HotplugError):
    """The guest refused the unplug (``DEVICE_UNPLUG_GUEST_ERROR``); the device stays."""

    def __init__(self, device_id: str, detail: str = "") -> None:
        self.device_id = device_id
        text = f"The guest refused to unplug {device_id}"
        super().__init__(text + (f": {detail}" if detail else ""), detail or None)


# --- what the QEMU at the other end can do -------------------------------------

class QemuIncompatible(HotplugError):
    """The QEMU behind the monitor cannot do what was asked; refused before anything was reserved."""


class QemuTooOld(QemuIncompatible):
    """QEMU is older than the oldest version kvmslots is tested against."""

    def __init__(self, version: tuple[int, int, int], minimum: tuple[int, int, int]) -> None:
        self.version = version
        self.minimum = minimum
        have, need = (".".join(map(str, v)) for v in (version, minimum))
        super().__init__(f"QEMU {have} is older than {need}, the oldest version kvmslots is tested against")


class QemuCommandMissing(QemuIncompatible):
    """QEMU lacks a QMP command hotplug needs (``device_add``, ``device_del``)."""

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__(f"QEMU has no QMP command {command!r}; hotplug is impossible through this monitor")


class BusNotHotpluggable(QemuIncompatible):
    """The bus a device would go to takes no hotplug; ``reason`` says why."""

    def __init__(self, bus: str, reason: str, *, vm: str | None = None) -> None:
        self.bus = bus
        self.reason = reason
        self.vm = vm
        super().__init__(f"Bus {bus!r} does not support hotplug: {reason}")


class MachineMismatch(QemuIncompatible):
    """The running QEMU's machine type is not the one the VM was planned with."""

    def __init__(self, vm: str, planned: str, running: str) -> None:
        self.vm = vm
        self.planned = planned
        self.running = running
        super().__init__(
            f"VM {vm!r} was planned for machine {planned!r} but QEMU runs {running!r}; "
            "its slots would not mean the same thing there"
        )


# --- host PCI passthrough ---------------------------------------------------

class PciError(KvmSlotsError):
    """A host PCI device operation failed."""


class InvalidPciAddress(ValidationError, PciError):
    """A host PCI address is not ``dddd:bb:ss.f`` within the PCI limits."""


class InvalidDeviceSpec(ValidationError, PciError):
    """A ``device_spec`` (whitelist) entry is malformed (Nova: ``PciConfigInvalidSpec``)."""


class PciDeviceInvalidPFRemoteManaged(InvalidDeviceSpec):
    """A ``remote_managed`` device_spec entry would tag a PF itself (only its VFs may be); ``address`` is the PF."""

    def __init__(self, message: str, address: str) -> None:
        self.address = address
        super().__init__(message)


class InvalidAlias(ValidationError, PciError):
    """A PCI alias is malformed or contradicts another one (Nova: ``PciInvalidAlias``)."""


class AliasNotDefined(ValidationError, PciError):
    """A flavor asks for an alias that is not configured (Nova: ``PciRequestAliasNotDefined``)."""


class InvalidPciRequest(ValidationError, PciError):
    """A flavor extra spec or PCI request is malformed (bad count, unknown key)."""


class InvalidDevicesJson(ValidationError, PciError):
    """The hypervisor's device list is malformed."""


class PciDeviceInvalidStatus(PciError):
    """The device is not in a state that allows the operation; nothing changed."""


class PciDeviceInvalidOwner(PciError):
    """The device belongs to another instance; nothing changed."""


class PciDeviceRequestFailed(PciError):
    """The host cannot satisfy the PCI requests; nothing was claimed."""


class UnknownPciDevice(PciError, LookupError):
    """No tracked host device has that address."""


class DiscoveryError(PciError):
    """Host PCI devices could not be listed (libvirt or sysfs)."""


class HostBindError(PciError):
    """A host device could not be bound to vfio-pci or given back to the host."""


class IommuGroupNotViable(HostBindError):
    """Another member of the function's IOMMU group is bound to a driver that does DMA; nothing was changed.

    vfio hands a whole IOMMU group to one user, so the kernel opens a group
    only when every other member has no driver or one that leaves DMA to
    its owner (vfio-pci and its vendor variants, pci-stub, pcieport); QEMU
    would refuse the function ("group N is not viable").  ``address`` is the
    function, ``iommu_group`` its group number, ``blocking`` maps each
    blocking member's address to its driver.
    """

    def __init__(self, address: str, iommu_group: int, blocking: dict[str, str]) -> None:
        self.address = address
        self.iommu_group = iommu_group
        self.blocking = dict(blocking)
        members = ", ".join(f"{member} (driver {driver})" for member, driver in sorted(self.blocking.items()))
        super().__init__(
            f"PCI device {address}: IOMMU group {iommu_group} is not viable for vfio-pci, other members are "
            f"bound to drivers that do DMA: {members}. Unbind them or bind them to vfio-pci as well; "
            f"{address} was left on its driver"
        )


# --- disposable test VMs -----------------------------------------------------

# --- live migration -------------------------------------------------------------

class MigrationError(KvmSlotsError):
    """A step of a live migration could not be taken; the records it guards are as they were.

    ``devices`` names the QEMU ids concerned, so a manager can act on each.
    """

    def __init__(self, message: str, *, devices: list[str] | None = None, **facts: object) -> None:
        super().__init__(message, **facts)
        self.devices = list(devices or [])


class MigrationRefused(MigrationError):
    """The source VM cannot migrate now; ``reason``: ``in_flight``, ``passthrough`` or ``not_running``."""

    def __init__(self, message: str, *, reason: str, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.reason = reason


class MigrationIncomplete(MigrationError):
    """QEMU does not report the migration complete (``state``: its status); nothing was released or confirmed."""


class MigrationMismatch(MigrationError):
    """The devices on the two ends differ (``devices``); records are kept for the manager to compare."""


class TestVMError(KvmSlotsError):
    """A disposable test VM could not be started or driven."""

    __test__ = False  # not a pytest test class despite the name


class GuestFilesMissing(TestVMError):
    """The tiny guest's kernel or initramfs has not been built."""


class GuestBootTimeout(TestVMError):
    """The guest did not reach its shell in time."""


class GuestBuildFailed(TestVMError):
    """``kvmslots guest build`` (the packaged guest recipe) did not produce the guest's files."""
