"""32-slot reservation maps, one per PCI bus.

A conventional PCI bus has 32 slots (device numbers 0..31).  A :class:`SlotMap`
records which of them are taken as a ``bitarray``: bit *n* set means slot *n*
is reserved.  The VM's *mask* marks slots that are never handed out (on a
default ``pc`` machine: 0 host bridge, 1 ISA/IDE/ACPI, 2 VGA, 3 default NIC),
and the lowest free slot wins, so the same inputs always give the same slots.

This module is pure: no I/O.  Who holds a slot (our devices, QEMU's live view)
is decided by the callers; this only keeps the bits honest.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from bitarray import bitarray

from ._shown import shown
from .errors import InvalidMask, InvalidSlot, SlotOccupied, SlotReserved, SlotsExhausted

__all__ = [
    "NUM_SLOTS",
    "DEFAULT_PCI_RESERVATIONS",
    "SlotMap",
    "validate_mask",
    "validate_slot",
    "reservation_mask",
]

#: Slots (device numbers) on one conventional PCI bus.
NUM_SLOTS = 32

#: Slots 0-3 are reserved: host bridge, ISA/IDE/ACPI, VGA and the default NIC
#: of QEMU's ``pc`` machine (the string Ganeti has always used).
DEFAULT_PCI_RESERVATIONS = "1111" + "0" * 28


def validate_mask(mask: object) -> str:
    """Return *mask* if it is exactly 32 characters of ``0``/``1``, else raise.

    Masks are strings (not bitarrays) at the API so they can be stored, typed in
    a config file and compared without surprises.
    """
    if not isinstance(mask, str):
        raise InvalidMask(f"Reservation mask must be a string of 32 '0'/'1' characters, got {type(mask).__name__}")
    if len(mask) != NUM_SLOTS or mask.strip("01"):
        raise InvalidMask(f"Reservation mask must be 32 characters of '0' and '1', got {shown(mask)}")
    return mask


def reservation_mask(count: object) -> str:
    """Ganeti 3.x's ``kvm_pci_reservations``: the first *count* slots (0-32) reserved, as a mask."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= NUM_SLOTS:
        raise InvalidMask(f"Reserved slot count must be an integer 0-{NUM_SLOTS}, got {shown(count)}")
    return "1" * count + "0" * (NUM_SLOTS - count)


def validate_slot(slot: object) -> int:
    """Return *slot* if it is an int in 0..31 (bools are refused), else raise."""
    if isinstance(slot, bool) or not isinstance(slot, int):
        raise InvalidSlot(f"PCI slot must be an integer 0-{NUM_SLOTS - 1}, got {shown(slot)}")
    if not 0 <= slot < NUM_SLOTS:
        raise InvalidSlot(f"PCI slot must be 0-{NUM_SLOTS - 1}, got {shown(slot)}")
    return slot


class SlotMap:
    """Reservations of one PCI bus: mask bits plus slots reserved since.

    Two explicit operations change it, :meth:`reserve` and :meth:`release`;
    each refuses what would make the map lie (reserving a taken slot, releasing
    a masked one) with a typed error instead of silently doing nothing.
    """

    __slots__ = ("_mask", "_bits", "bus")

    def __init__(self, mask: str = DEFAULT_PCI_RESERVATIONS, *, bus: str | None = None) -> None:
        self._mask = bitarray(validate_mask(mask))
        self._bits = self._mask.copy()
        self.bus = bus

    @property
    def mask(self) -> str:
        """The reservation mask this map was made with."""
        return self._mask.to01()

    def is_free(self, slot: int) -> bool:
        """True when *slot* is neither masked nor reserved."""
        return not self._bits[validate_slot(slot)]

    def is_masked(self, slot: int) -> bool:
        """True when the mask reserves *slot* (it is never handed out)."""
        return bool(self._mask[validate_slot(slot)])

    def first_free(self) -> int:
        """The lowest free slot; :class:`SlotsExhausted` when there is none."""
        slot = self._bits.find(0)
        if slot < 0:
            raise SlotsExhausted(self.bus)
        return slot

    def reserve(self, slot: int | None = None, holder: str | None = None) -> int:
        """Reserve *slot* (or the first free one) and return it."""
        if slot is None:
            slot = self.first_free()
        elif self.is_masked(slot):
            raise SlotReserved(slot, self.bus)
        elif not self.is_free(slot):
            raise SlotOccupied(slot, holder, self.bus)
        self._bits[slot] = 1
        return slot

    def occupy(self, slots: Iterable[int]) -> None:
        """Mark slots taken by others (e.g. QEMU's live view); taken twice is fine."""
        for slot in slots:
            self._bits[validate_slot(slot)] = 1

    def release(self, slot: int) -> None:
        """Free a reserved slot; masked or already free slots are an error."""
        if self.is_masked(slot):
            raise SlotReserved(slot, self.bus)
        if self.is_free(slot):
            raise InvalidSlot(f"Slot {slot} is not reserved; cannot release it")
        self._bits[slot] = 0

    def reserved(self) -> Iterator[int]:
        """Slots that are reserved (mask included), lowest first."""
        return self._bits.search(1)

    def free_count(self) -> int:
        """How many slots are still free."""
        return self._bits.count(0)

    def to01(self) -> str:
        """The map as a 32-character '0'/'1' string (slot 0 first)."""
        return self._bits.to01()

    def __repr__(self) -> str:
        return f"SlotMap({self.to01()!r}, bus={self.bus!r})"
