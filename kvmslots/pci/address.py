"""Host PCI addresses (``dddd:bb:ss.f``) and the vocabulary of Nova's device lists.

Addresses are validated against the PCI limits (domain <= 0xffff, bus <=
0xff, slot <= 0x1f, function <= 7) and kept in one canonical lowercase form,
so two spellings of one device can never become two records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._shown import shown
from ..errors import InvalidPciAddress, ValidationError

__all__ = [
    "PciAddress",
    "parse_address",
    "canonical_address",
    "validate_pci_id",
    "DEV_TYPE_PCI",
    "DEV_TYPE_PF",
    "DEV_TYPE_VF",
    "DEV_TYPES",
    "MAX_DOMAIN",
    "MAX_BUS",
    "MAX_SLOT",
    "MAX_FUNCTION",
]

DEV_TYPE_PCI = "type-PCI"
DEV_TYPE_PF = "type-PF"
DEV_TYPE_VF = "type-VF"
DEV_TYPES = (DEV_TYPE_PCI, DEV_TYPE_PF, DEV_TYPE_VF)

MAX_DOMAIN = 0xFFFF
MAX_BUS = 0xFF
MAX_SLOT = 0x1F
MAX_FUNCTION = 0x7

_ADDRESS_RE = re.compile(r"([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")
_PCI_ID_RE = re.compile(r"[0-9a-f]{4}")


@dataclass(frozen=True, order=True)
class PciAddress:
    """A host PCI function address; ``str()`` gives ``dddd:bb:ss.f``."""

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        for name, value, limit in (
            ("domain", self.domain, MAX_DOMAIN),
            ("bus", self.bus, MAX_BUS),
            ("slot", self.slot, MAX_SLOT),
            ("function", self.function, MAX_FUNCTION),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise InvalidPciAddress(f"PCI {name} must be 0..{limit:#x}, got {shown(value)}")

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def dev_id(self) -> str:
        """libvirt's node device name: ``pci_0000_04_00_3``."""
        return f"pci_{self.domain:04x}_{self.bus:02x}_{self.slot:02x}_{self.function:x}"


def parse_address(text: object) -> PciAddress:
    """Parse ``dddd:bb:ss.f``; :class:`InvalidPciAddress` names what is wrong."""
    if not isinstance(text, str):
        raise InvalidPciAddress(f"PCI address must be a string 'dddd:bb:ss.f', got {type(text).__name__}")
    match = _ADDRESS_RE.fullmatch(text.strip())
    if not match:
        raise InvalidPciAddress(f"PCI address must look like 0000:04:00.3, got {shown(text)}")
    domain, bus, slot, function = (int(part, 16) for part in match.groups())
    return PciAddress(domain, bus, slot, function)


def canonical_address(text: object) -> str:
    """The canonical ``dddd:bb:ss.f`` spelling of an address (validated)."""
    return str(parse_address(text))


def validate_pci_id(value: object, what: str = "PCI id", error: type[ValidationError] = ValidationError) -> str:
    """Vendor and product ids are 4 lowercase hex digits (Nova's format)."""
    if not isinstance(value, str) or not _PCI_ID_RE.fullmatch(value):
        raise error(f"{what} must be 4 lowercase hex digits, got {shown(value)}")
    return value
