"""Nova's ``[pci] device_spec`` (formerly ``passthrough_whitelist``): which host devices we track.

Operators already have these entries in their ``nova.conf``; they must work
here as written, so the accepted formats are Nova's::

    {"address": "*:0a:00.*", "physical_network": "physnet1"}          # glob
    {"address": {"domain": ".*", "bus": "02", "slot": "0[1-2]",
                 "function": "[2-7]"}}                                # regex per part
    {"address": ["0000:81:00.1", "0000:81:00.2"]}                     # address set (SR-IOV wiki)
    {"vendor_id": "1137", "product_id": "0071"}
    {"devname": "eth0", "physical_network": "physnet1"}               # not with address

Every key other than ``address``, ``devname``, ``vendor_id`` and
``product_id`` is a *tag* (``physical_network``, ``trusted``,
``remote_managed``, ...).  The first entry that matches a device wins and its
tags become the device's tags, so order matters and is preserved.

Why this module is shaped the way it is:

* It is pure (no sysfs, no libvirt).  Nova asks sysfs whether a full address
  is a PF so that the entry also covers the PF's VFs; we get the same effect
  from the device list itself: an entry naming one full address ``A`` also
  matches every device whose ``parent_addr`` is ``A``.  Only a PF has VFs, so
  this is exactly Nova's rule.  Likewise ``devname`` is compared with the
  device's ``devname`` (or a VF's ``parent_devname``) instead of being
  resolved through ``/sys/class/net``.
* :meth:`Whitelist.match` runs for every host device at every sync
  (thousands of VFs).  Everything is parsed and compiled once in
  :meth:`Whitelist.from_config`, and entries that name exact addresses (a full
  glob address, a regex dict spelling one address in full, an address list)
  sit in a dict keyed by address, so they cost nothing for devices they do
  not name.  First match
  wins is kept by working with entry *positions*: candidates from the address
  index (for the device and for its parent PF) and the remaining "scan"
  entries are merged in ascending position and the first one that really
  matches is returned.
* Every bad entry raises :class:`~kvmslots.errors.InvalidDeviceSpec` saying
  which entry, which key and which value is wrong; nothing is silently
  ignored (a typo in a whitelist once made Nova drop allocated devices).
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from .._shown import shown
from ..errors import (
    InvalidDevicesJson,
    InvalidDeviceSpec,
    InvalidPciAddress,
    PciDeviceInvalidPFRemoteManaged,
    ValidationError,
)
from .address import (
    DEV_TYPE_PF,
    MAX_BUS,
    MAX_DOMAIN,
    MAX_FUNCTION,
    MAX_SLOT,
    PciAddress,
    parse_address,
)

__all__ = [
    "ANY",
    "DeviceSpecEntry",
    "Whitelist",
    "AnyAddress",
    "GlobAddress",
    "RegexAddress",
    "ExactAddresses",
    "AddressMatcher",
    "parse_glob",
    "TAG_NAME_RE",
]

ANY = "*"
REGEX_ANY = ".*"
MAX_ID = 0xFFFF
IFNAMSIZ = 15  # longest Linux interface name

TAG_NAME_RE = re.compile(r"[a-z_][a-z0-9_:.-]*")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_RESERVED_KEYS = frozenset({"address", "devname", "vendor_id", "product_id"})
# Keys a request compares with the device record itself, never with its tags.
_RESERVED_TAGS = frozenset({"dev_type"})
_REGEX_PARTS = ("domain", "bus", "slot", "function")
_PART_LIMITS = {"domain": MAX_DOMAIN, "bus": MAX_BUS, "slot": MAX_SLOT, "function": MAX_FUNCTION}
# oslo's strutils.bool_from_string words (compared after strip() and lower()).
_TRUE_WORDS = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "f", "false", "off", "n", "no"})
_BOOL_WORDS_SHOWN = ", ".join(repr(w) for w in sorted(_TRUE_WORDS | _FALSE_WORDS))
# Tags whose values become 'true'/'false' (Nova's _normalize_device_spec_tag, plus remote_managed,
# which Nova reads as a boolean but keeps as written: "yes" would then never equal a port's "true").
BOOL_TAGS = frozenset({"managed", "live_migratable", "one_time_use", "remote_managed"})
# A regex dict whose four parts are spelled like this names one address (Nova's is_single_address
# + sysfs lookup): it is indexed and covers that PF's VFs.
_CANONICAL_PARTS = {
    "domain": re.compile(r"[0-9a-f]{4}"),
    "bus": re.compile(r"[0-9a-f]{2}"),
    "slot": re.compile(r"[0-9a-f]{2}"),
    "function": re.compile(r"[0-9a-f]"),
}

ConfigItem = str | Mapping[str, Any] | Sequence[Any]


# --- address matchers ----------------------------------------------------------

class AnyAddress:
    """No ``address`` key: every address matches."""

    exact: frozenset[str] = frozenset()

    def matches(self, addr: PciAddress, addr_s: str, parent_s: str | None) -> bool:
        """Always True: a spec without ``address`` covers every device."""
        return True

    def __repr__(self) -> str:
        return "AnyAddress()"


@dataclass(frozen=True)
class GlobAddress:
    """``"*:0a:00.*"``: each part an int, or None for ``*``; at least one part is ``*``."""

    domain: int | None
    bus: int | None
    slot: int | None
    function: int | None

    exact: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def matches(self, addr: PciAddress, addr_s: str, parent_s: str | None) -> bool:
        """Every part that is not ``*`` equals the device's own (the parent is not looked at)."""
        return (
            (self.domain is None or self.domain == addr.domain)
            and (self.bus is None or self.bus == addr.bus)
            and (self.slot is None or self.slot == addr.slot)
            and (self.function is None or self.function == addr.function)
        )


@dataclass(frozen=True)
class RegexAddress:
    """``{"bus": "02", "slot": "0[1-2]"}``: each pattern matches the start of the device's part.

    As in Nova (``re.match``): the device's parts are spelled in lowercase hex
    with 4/2/2/1 digits (``0000``, ``0a``, ``00``, ``1``); a pattern only has
    to match a prefix (``{"slot": "0"}`` covers slots 00-0f, ``"[0-3]"``
    matches ``00``; anchor with ``$`` for a full match) and case counts
    (``"0A"`` matches no bus).
    """

    patterns: tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]

    exact: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def matches(self, addr: PciAddress, addr_s: str, parent_s: str | None) -> bool:
        """Each pattern matches the start of the device's own part, in canonical spelling (the parent is not
        looked at)."""
        # addr_s is canonical "dddd:bb:ss.f": slicing is cheaper than formatting.
        domain, bus, slot, function = self.patterns
        return (
            domain.match(addr_s[0:4]) is not None
            and bus.match(addr_s[5:7]) is not None
            and slot.match(addr_s[8:10]) is not None
            and function.match(addr_s[11:]) is not None
        )


@dataclass(frozen=True)
class ExactAddresses:
    """One or more full addresses; each also matches the VFs of that address (Nova's PF rule)."""

    exact: frozenset[str]

    def matches(self, addr: PciAddress, addr_s: str, parent_s: str | None) -> bool:
        """The device is one of the addresses, or a VF whose PF is (*parent_s*: the PF's canonical address,
        None for a device without one)."""
        return addr_s in self.exact or (parent_s is not None and parent_s in self.exact)


AddressMatcher = AnyAddress | GlobAddress | RegexAddress | ExactAddresses


def _hex_part(text: str, name: str, limit: int, where: str) -> int:
    if not _HEX_RE.fullmatch(text):
        raise InvalidDeviceSpec(f"{where}: address {name} {shown(text)} is not a hex number or '*'")
    value = int(text, 16)
    if value > limit:
        raise InvalidDeviceSpec(
            f"{where}: address {name} {shown(text)} is greater than the maximum allowed value ({limit:#x})"
        )
    return value


def _glob_part(text: str, name: str, limit: int, where: str) -> int | None:
    text = text.strip()
    if text in ("", ANY):
        return None
    return _hex_part(text, name, limit, where)


def parse_glob(text: str, where: str = "device_spec") -> AddressMatcher:
    """Nova's glob ``[[[[<domain>]:]<bus>]:][<slot>][.[<function>]]``; a missing part is ``*``.

    A glob without any ``*`` names one device and becomes an
    :class:`ExactAddresses` (so it also covers that PF's VFs, and is indexed).
    """
    if not isinstance(text, str):
        raise InvalidDeviceSpec(f"{where}: address glob must be a string, got {type(text).__name__}")
    dbs, _, func = text.partition(".")
    function = _glob_part(func, "function", MAX_FUNCTION, where)
    fields = dbs.split(":") if dbs.strip() else []
    if len(fields) > 3:
        raise InvalidDeviceSpec(f"{where}: address {shown(text)} has more than three ':'-separated parts before '.'")
    fields = [ANY] * (3 - len(fields)) + fields
    domain = _glob_part(fields[0], "domain", MAX_DOMAIN, where)
    bus = _glob_part(fields[1], "bus", MAX_BUS, where)
    slot = _glob_part(fields[2], "slot", MAX_SLOT, where)
    if domain is None or bus is None or slot is None or function is None:
        return GlobAddress(domain, bus, slot, function)
    return ExactAddresses(frozenset({str(PciAddress(domain, bus, slot, function))}))


def _parse_regex_dict(raw: Mapping[str, Any], where: str) -> AddressMatcher:
    unknown = sorted(shown(key) for key in set(raw) - set(_REGEX_PARTS))
    if unknown:
        raise InvalidDeviceSpec(
            f"{where}: unknown address key(s) {', '.join(unknown)} "
            f"(expected {', '.join(_REGEX_PARTS)})"
        )
    texts: list[str] = []
    for name in _REGEX_PARTS:
        value = raw.get(name, REGEX_ANY)
        if not isinstance(value, str):
            raise InvalidDeviceSpec(f"{where}: address {name} must be a regex string, got {shown(value)}")
        if value == "":
            raise InvalidDeviceSpec(f"{where}: address {name} regex is empty (use '.*' for any)")
        texts.append(value)
    if all(_CANONICAL_PARTS[n].fullmatch(t) for t, n in zip(texts, _REGEX_PARTS)):
        # All four parts spell one address as sysfs does: Nova looks it up as a PF, so it also
        # covers that PF's VFs.  (Other all-hex spellings, "0" or "0A", stay prefix regexes, as in Nova.)
        domain, bus, slot, function = (
            _hex_part(t, n, _PART_LIMITS[n], where) for t, n in zip(texts, _REGEX_PARTS)
        )
        return ExactAddresses(frozenset({str(PciAddress(domain, bus, slot, function))}))
    compiled = []
    for name, text in zip(_REGEX_PARTS, texts):
        try:
            compiled.append(re.compile(text))
        except (re.error, RecursionError, OverflowError) as exc:
            # Python's regex parser recurses per group ("((((...": RecursionError) and refuses
            # repeat counts beyond 2**32 ("a{4294967296}": OverflowError)
            reason = "its groups nest too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise InvalidDeviceSpec(f"{where}: address {name} {shown(text)} is not a valid regex: {reason}") from None
    return RegexAddress((compiled[0], compiled[1], compiled[2], compiled[3]))


def _parse_address_list(raw: Sequence[Any], where: str) -> AddressMatcher:
    if not raw:
        raise InvalidDeviceSpec(f"{where}: address list is empty")
    found: set[str] = set()
    for index, item in enumerate(raw):
        try:
            found.add(str(parse_address(item)))
        except InvalidPciAddress as exc:
            raise InvalidDeviceSpec(f"{where}: address list item {index}: {exc}") from None
    return ExactAddresses(frozenset(found))


def _parse_address(raw: Any, where: str) -> AddressMatcher:
    if isinstance(raw, str):
        return parse_glob(raw, where)
    if isinstance(raw, Mapping):
        return _parse_regex_dict(raw, where)
    if isinstance(raw, list):
        return _parse_address_list(raw, where)
    raise InvalidDeviceSpec(
        f"{where}: address must be a glob string, a dict of regexes or a list of addresses, "
        f"got {type(raw).__name__} {shown(raw)}"
    )


# --- one entry -----------------------------------------------------------------

def _parse_id(raw: Any, key: str, where: str) -> str:
    """``"8086"``, ``"*"``; like Nova, 1-4 hex digits in either case, kept as 4 lowercase."""
    if not isinstance(raw, str):
        raise InvalidDeviceSpec(f"{where}: {key} must be a string of hex digits or '*', got {shown(raw)}")
    text = raw.strip()
    if text == ANY:
        return ANY
    if not _HEX_RE.fullmatch(text) or len(text) > 4:
        raise InvalidDeviceSpec(f"{where}: {key} {shown(raw)} is not a hex id of at most 4 digits (or '*')")
    return f"{int(text, 16):04x}"


def _parse_devname(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > IFNAMSIZ or any(c.isspace() or c in "/:" for c in raw):
        raise InvalidDeviceSpec(
            f"{where}: devname must be a network interface name (1-{IFNAMSIZ} characters, "
            f"no whitespace, '/' or ':'), got {shown(raw)}"
        )
    return raw


def _parse_tag(name: str, value: Any, where: str) -> str | None:
    if not TAG_NAME_RE.fullmatch(name):
        raise InvalidDeviceSpec(f"{where}: tag name {shown(name)} must match {TAG_NAME_RE.pattern}")
    if name in _RESERVED_TAGS:
        raise InvalidDeviceSpec(f"{where}: {shown(name)} is not a device_spec key (it comes from the hypervisor)")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return None  # Nova's docs write "physical_network": null: no such tag
    if not isinstance(value, str):
        raise InvalidDeviceSpec(
            f"{where}: tag {shown(name)} must be a string, got {type(value).__name__} {shown(value)}"
        )
    return value


def bool_word(value: object) -> str | None:
    """``'true'``/``'false'`` for a boolean, or for one of oslo's ``bool_from_string`` words in any
    case with spaces around it (``yes``, ``OFF``, ``1`` ...); None for anything else.  The one
    reading of boolean tags shared by device specs, aliases and pools."""
    if isinstance(value, bool):
        return "true" if value else "false"
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE_WORDS:
        return "true"
    if word in _FALSE_WORDS:
        return "false"
    return None


def _bool_tag_value(name: str, value: Any, where: str) -> str:
    """Nova's ``_normalize_device_spec_tag``: a boolean-like value becomes 'true' or 'false'.

    Like oslo's ``bool_from_string(strict=True)``: a JSON boolean, or a word
    of :data:`_TRUE_WORDS`/:data:`_FALSE_WORDS` in any case and with spaces
    around it; JSON 0 and 1 too (Nova reads them as ``str(value)``).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return "true" if value else "false"
    word = bool_word(value)
    if word is not None:
        return word
    raise InvalidDeviceSpec(
        f"{where}: tag {shown(name)} must be 'true' or 'false', got {shown(value)} "
        f"(acceptable values, in any case: {_BOOL_WORDS_SHOWN})"
    )


@dataclass(frozen=True)
class DeviceSpecEntry:
    """One parsed ``device_spec`` entry; build it with :meth:`from_dict`."""

    address: AddressMatcher
    vendor_id: str = ANY
    product_id: str = ANY
    devname: str | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    remote_managed: bool = False
    where: str = field(default="device_spec", compare=False)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "device_spec entry") -> DeviceSpecEntry:
        """Validate one entry (a dict as in nova.conf); errors start with ``where``."""
        if not isinstance(raw, Mapping):
            raise InvalidDeviceSpec(f"{where}: expected a JSON object, got {type(raw).__name__} {shown(raw)}")
        for key in raw:
            if not isinstance(key, str):
                raise InvalidDeviceSpec(f"{where}: key {key!r} is not a string")
        if "address" in raw and "devname" in raw:
            raise InvalidDeviceSpec(f"{where}: 'address' and 'devname' are mutually exclusive")
        devname = _parse_devname(raw["devname"], where) if "devname" in raw else None
        address = _parse_address(raw["address"], where) if "address" in raw else AnyAddress()
        tags: dict[str, str] = {}
        for key, value in raw.items():
            if key in _RESERVED_KEYS:
                continue
            if key in BOOL_TAGS and value is not None:
                tags[key] = _bool_tag_value(key, value, where)
                continue
            tag = _parse_tag(key, value, where)
            if tag is not None:
                tags[key] = tag
        if tags.get("one_time_use") == "true":
            # Nova: "one_time_use=true requires pci.report_in_placement to be enabled"; kvmslots
            # has no placement reporting, so it could not keep the promise.
            raise InvalidDeviceSpec(
                f"{where}: one_time_use=true requires [pci] report_in_placement, "
                "which kvmslots does not implement"
            )
        return cls(
            address=address,
            vendor_id=_parse_id(raw.get("vendor_id", ANY), "vendor_id", where),
            product_id=_parse_id(raw.get("product_id", ANY), "product_id", where),
            devname=devname,
            tags=MappingProxyType(tags),
            remote_managed=tags.get("remote_managed") == "true",
            where=where,
        )

    @property
    def exact_addresses(self) -> frozenset[str]:
        """The full addresses this entry names (empty unless the address is exact)."""
        return self.address.exact

    def get_tags(self) -> dict[str, str]:
        """A copy of the entry's tags (Nova's ``get_tags``)."""
        return dict(self.tags)

    def match(self, dev: Mapping[str, Any]) -> bool:
        """Does this entry cover the hypervisor device dict ``dev``?

        Raises :class:`~kvmslots.errors.InvalidDeviceSpec` when the entry is
        ``remote_managed`` and names ``dev``, a PF (see :meth:`check_pf`).
        """
        addr, addr_s, parent_s = _device_addresses(dev)
        self.check_pf(dev, addr_s)
        return self._matches(dev, addr, addr_s, parent_s)

    @property
    def names_devices(self) -> bool:
        """Does the entry name devices (full addresses or an interface name), not patterns?"""
        return self.devname is not None or bool(self.address.exact)

    def check_pf(self, dev: Mapping[str, Any], addr_s: str) -> None:
        """Nova's refusal of remote-managed PFs (``PciDeviceInvalidPFRemoteManaged``).

        Nova checks at start-up, through sysfs, each ``remote_managed`` entry
        whose address (or ``devname``) is a PF: the entry may only cover that
        PF's VFs, so its ``product_id`` must be the VFs' one.  We have no
        sysfs but we have the device: when ``dev`` is a PF named by this
        entry (one of its full addresses, or its ``devname``), a
        ``vendor_id`` other than the PF's (VFs share their PF's vendor) or a
        ``product_id`` of ``*`` or the PF's own makes the entry invalid.
        A ``product_id`` that is neither the PF's nor the VFs' (Nova's third
        error) cannot be told from the PF record alone; such an entry simply
        covers nothing.  Entries with wildcard addresses are not checked,
        as in Nova.
        """
        if not self.remote_managed or dev.get("dev_type") != DEV_TYPE_PF:
            return
        if self.devname is not None:
            if dev.get("devname") != self.devname:
                return
        elif addr_s not in self.address.exact:
            return
        vendor, product = _lower(dev.get("vendor_id")), _lower(dev.get("product_id"))
        if self.vendor_id not in (ANY, vendor):
            raise InvalidDeviceSpec(
                f"{self.where}: the remote_managed entry names the PF {addr_s} but its vendor_id "
                f"{shown(self.vendor_id)} is not the PF's ({shown(vendor)}); a VF has its PF's vendor ID"
            )
        if self.product_id in (ANY, product):
            raise PciDeviceInvalidPFRemoteManaged(
                f"{self.where}: PFs must not have the 'remote_managed' tag, device address: {addr_s} "
                f"(to cover its VFs, set product_id to the VFs' product ID)",
                addr_s,
            )

    def _matches(self, dev: Mapping[str, Any], addr: PciAddress, addr_s: str, parent_s: str | None) -> bool:
        if self.vendor_id != ANY and _lower(dev.get("vendor_id")) != self.vendor_id:
            return False
        if self.product_id != ANY and _lower(dev.get("product_id")) != self.product_id:
            return False
        if self.devname is not None:
            if dev.get("devname") != self.devname and dev.get("parent_devname") != self.devname:
                return False
        elif not self.address.matches(addr, addr_s, parent_s):
            return False
        return not self.remote_managed or _has_card_serial(dev)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _has_card_serial(dev: Mapping[str, Any]) -> bool:
    """Nova ignores ``remote_managed`` devices without a VPD card serial number."""
    caps = dev.get("capabilities")
    vpd = caps.get("vpd") if isinstance(caps, Mapping) else None
    return bool(vpd.get("card_serial_number")) if isinstance(vpd, Mapping) else False


@lru_cache(maxsize=65536)
def _canonical(text: str) -> tuple[PciAddress, str]:
    addr = parse_address(text)
    return addr, str(addr)


def _device_addresses(dev: Mapping[str, Any]) -> tuple[PciAddress, str, str | None]:
    """The device's address (parsed and canonical) and its parent's canonical address."""
    if not isinstance(dev, Mapping):
        raise InvalidDevicesJson(f"a device must be a JSON object, got {type(dev).__name__}")
    raw = dev.get("address")
    if not isinstance(raw, str):
        raise InvalidDevicesJson(
            f"device {shown(dev.get('dev_id', dev))}: 'address' must be a string, got {shown(raw)}"
        )
    try:
        addr, addr_s = _canonical(raw)
        parent = dev.get("parent_addr")
        if parent is None or parent == "":
            return addr, addr_s, None
        if not isinstance(parent, str):
            raise InvalidPciAddress(f"parent_addr must be a string, got {shown(parent)}")
        return addr, addr_s, _canonical(parent)[1]
    except InvalidPciAddress as exc:
        raise InvalidDevicesJson(f"device {shown(raw)}: {exc}") from None


# --- the whole list --------------------------------------------------------------

def load_json(text: str | bytes, where: str, error: type[ValidationError]) -> Any:
    """*text* as JSON; *error* ("*where* is not valid JSON", with the start of the text) if it is not."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON: {exc}: {shown(text, 82)}") from None


def config_entries(
    config: ConfigItem | None, option: str, error: type[ValidationError], kind: str = "entries"
) -> Iterator[tuple[Any, str]]:
    """Yield ``(raw entry, where)`` for every entry of a multi-valued JSON option of nova.conf's
    ``[pci]`` section (``device_spec``, ``alias``), in config order.

    *config* is a list whose items are JSON strings (one per ``option =`` line), dicts, or lists of
    those; or one JSON string holding a list (or one object); or one dict.  A string item may itself
    hold a JSON list.  *where* names the entry (``alias entry 2``, ``device_spec entry 0[1]``) for the
    caller's errors; the members of a list are the caller's to check.  Malformed JSON, or a config or
    item of another shape, raises *error*.
    """
    if config is None:
        return
    if isinstance(config, str):
        loaded = load_json(config, option, error)
        items = loaded if isinstance(loaded, list) else [loaded]
    elif isinstance(config, Mapping):
        items = [config]
    elif isinstance(config, (list, tuple)):
        items = list(config)
    else:
        raise error(f"{option} must be a list of {kind}, got {type(config).__name__}")
    for index, item in enumerate(items):
        where = f"{option} entry {index}"
        if isinstance(item, str):
            item = load_json(item, where, error)
        if isinstance(item, list):
            for sub, inner in enumerate(item):
                yield inner, f"{where}[{sub}]"
        elif isinstance(item, Mapping):
            yield item, where
        else:
            raise error(f"{where}: expected a JSON object or a list of objects, got {shown(item)}")


class Whitelist:
    """The parsed ``device_spec`` list; decides which devices are tracked and their tags.

    Entry positions are config order.  ``_by_address`` maps a canonical
    address to the ascending positions of the entries naming it exactly;
    ``_scan`` holds the ascending positions of every other entry.  A device's
    candidates are the index hits for its own address, the hits for its
    ``parent_addr`` and the scan entries, merged by position: the first one
    that fully matches is the one Nova's linear scan would have found.
    """

    def __init__(self, entries: Iterable[DeviceSpecEntry] = ()) -> None:
        self.specs: tuple[DeviceSpecEntry, ...] = tuple(entries)
        by_address: dict[str, list[int]] = {}
        scan: list[int] = []
        for position, entry in enumerate(self.specs):
            if entry.devname is None and entry.exact_addresses:
                for address in entry.exact_addresses:
                    by_address.setdefault(address, []).append(position)
            else:
                scan.append(position)
        self._by_address: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in by_address.items()}
        self._scan: tuple[int, ...] = tuple(scan)
        # remote_managed entries naming devices: checked against every PF (Nova checks them at start-up)
        self._pf_checks: tuple[DeviceSpecEntry, ...] = tuple(
            entry for entry in self.specs if entry.remote_managed and entry.names_devices
        )

    @classmethod
    def from_config(cls, entries: ConfigItem | None) -> Whitelist:
        """Parse nova.conf's ``device_spec`` values.

        ``entries`` is a list whose items are JSON strings (one per
        ``device_spec =`` line), dicts, or lists of those; or one JSON string
        holding a list.  A string item may itself hold a JSON list.
        """
        listed = config_entries(entries, "device_spec", InvalidDeviceSpec)
        return cls(DeviceSpecEntry.from_dict(raw, where) for raw, where in listed)

    def __len__(self) -> int:
        return len(self.specs)

    def get_devspec(self, dev: Mapping[str, Any]) -> DeviceSpecEntry | None:
        """The first entry matching ``dev``, or None.

        Raises :class:`~kvmslots.errors.InvalidDeviceSpec` when ``dev`` is a
        PF that a ``remote_managed`` entry names (any entry, not only the
        first match: Nova refuses such a config whatever its order).
        """
        addr, addr_s, parent_s = _device_addresses(dev)
        if self._pf_checks:
            for entry in self._pf_checks:
                entry.check_pf(dev, addr_s)
        own = self._by_address.get(addr_s, ())
        parents = self._by_address.get(parent_s, ()) if parent_s is not None else ()
        candidates: Iterable[int] = heapq.merge(self._scan, own, parents) if own or parents else self._scan
        specs = self.specs
        for position in candidates:
            if specs[position]._matches(dev, addr, addr_s, parent_s):
                return specs[position]
        return None

    def match(self, dev: Mapping[str, Any]) -> dict[str, str] | None:
        """Tags of the first entry matching ``dev`` (possibly ``{}``); None when nothing matches."""
        spec = self.get_devspec(dev)
        return None if spec is None else spec.get_tags()

    def device_assignable(self, dev: Mapping[str, Any]) -> bool:
        """Is ``dev`` covered by some entry?"""
        return self.get_devspec(dev) is not None
