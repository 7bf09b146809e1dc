"""Nova's PCI aliases and the PCI requests a flavor makes (``nova.pci.request``).

Operators define aliases in ``[pci] alias`` and ask for devices with the
flavor extra spec ``pci_passthrough:alias = "QAT:2, GPU:1"``::

    {"name": "QAT", "vendor_id": "8086", "product_id": "0443",
     "device_type": "type-PCI", "numa_policy": "required"}

Aliases sharing a name are alternatives (any one of them may answer) and
must agree on ``device_type`` and ``numa_policy``.  As in Nova 34 every alias
names both ``vendor_id`` and ``product_id``, and an unknown key is an error
(a typo must not become a tag no device carries).  Following the OpenStack
wiki's SR-IOV design ("PCI passthrough SRIOV support") an alias may also
name device tags that a device must carry: the well-known ones
(:data:`ALIAS_TAG_KEYS`, e.g. ``"physical_network": "physnet1"``) and any
tag the caller allows with ``extra_tags`` (the tags of its ``device_spec``).
The boolean tags (:data:`BOOL_TAGS`) are normalised to ``"true"``/``"false"``,
as ``device_spec`` tags are.

A flavor's extra spec becomes a list of :class:`InstancePciRequest`, each
with a fresh ``request_id``: that id is later stamped on the devices that
answer the request, which is how an instance tells which device serves which
alias.  The requests are stored with the instance (``system_metadata``) so the
flavor and the alias config need not be read again; during a resize a second
set lives under a prefix such as ``new_``.

This module is pure: configuration and metadata come in as arguments.
Every malformed input raises a typed error naming the key, value or entry.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._shown import shown
from ..errors import AliasNotDefined, InvalidAlias, InvalidPciRequest
from .address import DEV_TYPES
from .devspec import BOOL_TAGS, TAG_NAME_RE, bool_word, config_entries, load_json

__all__ = [
    "NUMA_POLICY_REQUIRED",
    "NUMA_POLICY_LEGACY",
    "NUMA_POLICY_PREFERRED",
    "NUMA_POLICY_SOCKET",
    "NUMA_POLICIES",
    "SOURCE_FLAVOR",
    "SOURCE_PORT",
    "SOURCES",
    "ALIAS_EXTRA_SPEC",
    "EXTRA_SPEC_PREFIX",
    "ALIAS_TAG_KEYS",
    "BOOL_TAGS",
    "AliasSpec",
    "Alias",
    "parse_alias",
    "parse_aliases",
    "InstancePciRequest",
    "requests_to_json",
    "requests_from_json",
    "get_pci_requests_from_flavor",
    "save_flavor_pci_info",
    "get_instance_pci_requests",
    "delete_flavor_pci_info",
    "request_matches",
    "values_match",
]

NUMA_POLICY_REQUIRED = "required"
NUMA_POLICY_LEGACY = "legacy"
NUMA_POLICY_PREFERRED = "preferred"
NUMA_POLICY_SOCKET = "socket"
NUMA_POLICIES = (NUMA_POLICY_REQUIRED, NUMA_POLICY_LEGACY, NUMA_POLICY_PREFERRED, NUMA_POLICY_SOCKET)

SOURCE_FLAVOR = "flavor"
SOURCE_PORT = "port"
#: A guest device of kvmslots' own passthrough path; its request id is the guest device's UUID.
SOURCE_PASSTHROUGH = "passthrough"
SOURCES = (SOURCE_FLAVOR, SOURCE_PORT, SOURCE_PASSTHROUGH)

EXTRA_SPEC_PREFIX = "pci_passthrough:"
ALIAS_EXTRA_SPEC = EXTRA_SPEC_PREFIX + "alias"
METADATA_KEY = "pci_requests"
ALIAS_NAME_MAX = 256  # Nova's schema

_ID_RE = re.compile(r"[0-9a-fA-F]{4}")
_LOWER_ID_RE = re.compile(r"[0-9a-f]{4}")
_COUNT_RE = re.compile(r"[0-9]+")
_MAX_COUNT_DIGITS = 4000  # significant digits; below the 4300 digits Python's int() accepts
# Keys of a request spec compared with the device record; every other key is a tag.
_DEVICE_FIELDS = frozenset({"vendor_id", "product_id", "dev_type"})
_ALIAS_KEYS = frozenset({"name", "vendor_id", "product_id", "device_type", "numa_policy", "capability_type"})
#: Device tags an alias may require without being told of them (Nova 34's schema has only
#: ``live_migratable``; the others are kvmslots' alias tags after the OpenStack wiki's
#: SR-IOV design, "PCI passthrough SRIOV support").
ALIAS_TAG_KEYS = frozenset({"live_migratable", "managed", "physical_network", "remote_managed", "trusted"})
_NOT_ALIAS_KEYS = {
    "dev_type": "use 'device_type'",
    "device_id": "use 'product_id'",
    "address": "addresses belong in device_spec",
    "devname": "interface names belong in device_spec",
    "resource_class": "placement-based PCI tracking is not supported: match by vendor_id/product_id and tags",
    "traits": "placement-based PCI tracking is not supported: match by vendor_id/product_id and tags",
}
_REQUEST_KEYS = frozenset({"count", "spec", "alias_name", "numa_policy", "request_id", "source"})


# --- aliases -------------------------------------------------------------------

@dataclass(frozen=True)
class AliasSpec:
    """One ``[pci] alias`` entry: one alternative of the alias ``name``."""

    name: str
    vendor_id: str | None = None  # None: any vendor (Nova's schema requires only the name)
    product_id: str | None = None
    device_type: str | None = None  # None: any type but a PF (as in Nova)
    numa_policy: str = NUMA_POLICY_LEGACY
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def to_spec(self) -> dict[str, str]:
        """The request spec of this alternative: Nova's keys (``dev_type``) plus the extra tags."""
        spec = {key: value for key, value in (("vendor_id", self.vendor_id), ("product_id", self.product_id)) if value}
        if self.device_type is not None:
            spec["dev_type"] = self.device_type
        spec.update(self.extra)
        return spec


Alias = AliasSpec  # the name the design notes use


def _alias_name(raw: Any, where: str) -> str:
    if not isinstance(raw, str):
        raise InvalidAlias(f"{where}: 'name' must be a string, got {shown(raw)}")
    name = raw.strip()
    if not name:
        raise InvalidAlias(f"{where}: 'name' is empty")
    if len(name) > ALIAS_NAME_MAX:
        raise InvalidAlias(f"{where}: 'name' is longer than {ALIAS_NAME_MAX} characters")
    if ":" in name or "," in name:
        raise InvalidAlias(f"{where}: 'name' {shown(name)} must not contain ':' or ',' (they separate the extra spec)")
    return name


def _alias_id(raw: Any, key: str, where: str) -> str:
    if not isinstance(raw, str) or not _ID_RE.fullmatch(raw):
        raise InvalidAlias(f"{where}: {key!r} must be 4 hex digits, got {shown(raw)}")
    return raw.lower()


def _choice(raw: Any, key: str, allowed: Sequence[str], where: str) -> str:
    if not isinstance(raw, str) or raw not in allowed:
        raise InvalidAlias(f"{where}: {key!r} must be one of {', '.join(allowed)}, got {shown(raw)}")
    return raw


def _bool_word(raw: Any, key: str, where: str) -> str:
    word = bool_word(raw)
    if word is not None:
        return word
    raise InvalidAlias(f"{where}: {key!r} must be true or false, got {shown(raw)}")


def _alias_extra(key: str, raw: Any, where: str, extra_tags: frozenset[str]) -> str:
    if key in _NOT_ALIAS_KEYS:
        raise InvalidAlias(f"{where}: unknown key {key!r} ({_NOT_ALIAS_KEYS[key]})")
    if not TAG_NAME_RE.fullmatch(key):
        raise InvalidAlias(f"{where}: extra key {key!r} must match {TAG_NAME_RE.pattern}")
    if key not in ALIAS_TAG_KEYS and key not in extra_tags:
        raise InvalidAlias(
            f"{where}: unknown key {key!r} (an alias has name, vendor_id, product_id, device_type, numa_policy, "
            f"capability_type and the tags {', '.join(sorted(ALIAS_TAG_KEYS))}; other device_spec tags must be "
            "allowed with extra_tags)"
        )
    if key in BOOL_TAGS:
        return _bool_word(raw, key, where)
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if not isinstance(raw, str):
        raise InvalidAlias(f"{where}: extra key {key!r} must have a string value, got {shown(raw)}")
    return raw


def _tag_names(extra_tags: Iterable[str]) -> frozenset[str]:
    if isinstance(extra_tags, (str, bytes)) or not isinstance(extra_tags, Iterable):
        raise InvalidAlias(f"extra_tags must be a list of tag names, got {type(extra_tags).__name__}")
    names = frozenset(extra_tags)
    for name in names:
        if not isinstance(name, str) or not TAG_NAME_RE.fullmatch(name):
            raise InvalidAlias(f"extra_tags: {shown(name)} is not a tag name ({TAG_NAME_RE.pattern})")
    return names


def _require_ids(aliases: Mapping[str, Sequence[AliasSpec]]) -> None:
    """Nova 34 (``_validate_required_ids``): every alternative names vendor_id and product_id."""
    missing = sorted(
        name for name, specs in aliases.items() if any(s.vendor_id is None or s.product_id is None for s in specs)
    )
    if missing:
        raise InvalidAlias(f"The PCI alias(es) {','.join(missing)} does not have vendor_id and product_id fields set.")


def parse_alias(raw: Any, where: str = "alias", extra_tags: Iterable[str] = ()) -> AliasSpec:
    """Validate one alias (a dict, or a JSON object in a string).

    ``extra_tags`` names device tags (beyond :data:`ALIAS_TAG_KEYS`) the alias may require.
    """
    if isinstance(raw, str):
        raw = load_json(raw, where, InvalidAlias)
    spec = _alias_from_object(raw, where, _tag_names(extra_tags))
    _require_ids({spec.name: [spec]})
    return spec


def _alias_from_object(raw: Any, where: str, extra_tags: frozenset[str] = frozenset()) -> AliasSpec:
    if not isinstance(raw, Mapping):
        raise InvalidAlias(f"{where}: expected a JSON object, got {type(raw).__name__} {shown(raw)}")
    for key in raw:
        if not isinstance(key, str):
            raise InvalidAlias(f"{where}: key {key!r} is not a string")
    if "name" not in raw:
        raise InvalidAlias(f"{where}: 'name' is required")
    name = _alias_name(raw["name"], where)
    where = f"{where} ({shown(name)})"
    if "capability_type" in raw:
        _choice(raw["capability_type"], "capability_type", ("pci",), where)
    device_type = raw.get("device_type")
    if device_type is not None or "device_type" in raw:
        device_type = _choice(device_type, "device_type", DEV_TYPES, where)
    extra = {
        key: _alias_extra(key, value, where, extra_tags) for key, value in raw.items() if key not in _ALIAS_KEYS
    }
    return AliasSpec(
        name=name,
        vendor_id=_alias_id(raw["vendor_id"], "vendor_id", where) if "vendor_id" in raw else None,
        product_id=_alias_id(raw["product_id"], "product_id", where) if "product_id" in raw else None,
        device_type=device_type,
        numa_policy=_choice(raw.get("numa_policy", NUMA_POLICY_LEGACY), "numa_policy", NUMA_POLICIES, where),
        extra=MappingProxyType(extra),
    )


def parse_aliases(config: Any, extra_tags: Iterable[str] = ()) -> dict[str, list[AliasSpec]]:
    """Parse ``[pci] alias``: alias name -> its alternatives, in config order.

    ``config`` is a list of JSON strings or dicts (one per ``alias =`` line),
    or one JSON string holding a list.  Alternatives of one name must agree
    on ``device_type`` ("Device type mismatch for alias 'X'") and on
    ``numa_policy``; every alternative names ``vendor_id`` and ``product_id``
    ("The PCI alias(es) a1,a2 does not have vendor_id and product_id fields
    set.", Nova 34's text).  ``extra_tags`` names the device tags, beyond
    :data:`ALIAS_TAG_KEYS`, that an alias may require (typically the tags of
    the host's ``device_spec``); any other key is an error.
    """
    tags = _tag_names(extra_tags)
    aliases: dict[str, list[AliasSpec]] = {}
    for raw, where in config_entries(config, "alias", InvalidAlias, "aliases"):
        spec = _alias_from_object(raw, where, tags)
        known = aliases.setdefault(spec.name, [])
        if known:
            if known[0].numa_policy != spec.numa_policy:
                raise InvalidAlias(f"NUMA policy mismatch for alias '{spec.name}'")
            if known[0].device_type != spec.device_type:
                raise InvalidAlias(f"Device type mismatch for alias '{spec.name}'")
        known.append(spec)
    _require_ids(aliases)
    return aliases


# --- requests ------------------------------------------------------------------

def _check_spec(spec: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(spec, list) or not spec:
        raise InvalidPciRequest(f"{where}: 'spec' must be a non-empty list of alternatives, got {shown(spec)}")
    checked = []
    for index, alternative in enumerate(spec):
        if not isinstance(alternative, Mapping):
            raise InvalidPciRequest(f"{where}: spec[{index}] must be an object, got {shown(alternative)}")
        for key, value in alternative.items():
            _check_spec_pair(key, value, f"{where}: spec[{index}]")
        checked.append(dict(alternative))
    return checked


def _check_spec_pair(key: Any, value: Any, where: str) -> None:
    if not isinstance(key, str) or not TAG_NAME_RE.fullmatch(key):
        raise InvalidPciRequest(f"{where}: key {key!r} must match {TAG_NAME_RE.pattern}")
    if not isinstance(value, str):
        raise InvalidPciRequest(f"{where}: {key!r} must be a string, got {shown(value)}")
    if key in ("vendor_id", "product_id") and not _LOWER_ID_RE.fullmatch(value):
        raise InvalidPciRequest(f"{where}: {key!r} must be 4 lowercase hex digits, got {shown(value)}")
    if key == "dev_type" and value not in DEV_TYPES:
        raise InvalidPciRequest(f"{where}: 'dev_type' must be one of {', '.join(DEV_TYPES)}, got {shown(value)}")


def _check_request_id(value: Any, where: str) -> str | None:
    if value is None:
        return None
    try:
        if isinstance(value, str) and str(uuid.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise InvalidPciRequest(f"{where}: 'request_id' must be a lowercase canonical UUID or null, got {shown(value)}")


@dataclass
class InstancePciRequest:
    """What an instance needs: ``count`` devices each matching one of ``spec``'s alternatives.

    ``spec`` holds one dict per alternative (``vendor_id``, ``product_id``,
    ``dev_type`` and extra tags); ``request_id`` marks the devices that answer
    it.  Constructing one validates it (:class:`InvalidPciRequest`).
    """

    count: int
    spec: list[dict[str, str]]
    alias_name: str | None = None
    numa_policy: str = NUMA_POLICY_LEGACY
    request_id: str | None = None
    source: str = SOURCE_FLAVOR

    def __post_init__(self) -> None:
        label = self.alias_name or self.request_id or ""
        where = f"PCI request {label if isinstance(label, str) else shown(label)}".rstrip()
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise InvalidPciRequest(f"{where}: 'count' must be a positive integer, got {shown(self.count)}")
        self.spec = _check_spec(self.spec, where)
        if self.alias_name is not None and (not isinstance(self.alias_name, str) or not self.alias_name):
            raise InvalidPciRequest(
                f"{where}: 'alias_name' must be a non-empty string or null, got {shown(self.alias_name)}"
            )
        if self.numa_policy not in NUMA_POLICIES:
            raise InvalidPciRequest(
                f"{where}: 'numa_policy' must be one of {', '.join(NUMA_POLICIES)}, got {shown(self.numa_policy)}"
            )
        self.request_id = _check_request_id(self.request_id, where)
        if self.source not in SOURCES:
            raise InvalidPciRequest(f"{where}: 'source' must be one of {', '.join(SOURCES)}, got {shown(self.source)}")

    def to_dict(self) -> dict[str, Any]:
        """The request as stored and exported, JSON-ready; :meth:`from_dict` reads it back."""
        return {
            "count": self.count,
            "spec": [dict(alternative) for alternative in self.spec],
            "alias_name": self.alias_name,
            "numa_policy": self.numa_policy,
            "request_id": self.request_id,
            "source": self.source,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text with sorted keys: one request, one text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any) -> InstancePciRequest:
        """Rebuild a stored request; anything malformed is :class:`InvalidPciRequest`."""
        if not isinstance(raw, Mapping):
            raise InvalidPciRequest(f"a stored PCI request must be an object, got {shown(raw)}")
        unknown = sorted(k if isinstance(k, str) else shown(k) for k in set(raw) - _REQUEST_KEYS)
        if unknown:
            raise InvalidPciRequest(f"stored PCI request has unknown key(s): {', '.join(unknown)}")
        for key in ("count", "spec"):
            if key not in raw:
                raise InvalidPciRequest(f"stored PCI request lacks {key!r}")
        return cls(
            count=raw["count"],
            spec=raw["spec"],
            alias_name=raw.get("alias_name"),
            numa_policy=raw.get("numa_policy", NUMA_POLICY_LEGACY),
            request_id=raw.get("request_id"),
            source=raw.get("source", SOURCE_FLAVOR),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> InstancePciRequest:
        """:meth:`from_dict` from JSON text; bad JSON is :class:`InvalidPciRequest` too."""
        return cls.from_dict(load_json(text, "stored PCI request", InvalidPciRequest))


def requests_to_json(requests: Iterable[InstancePciRequest]) -> str:
    """A list of requests as one JSON text (what instance metadata stores)."""
    return json.dumps([request.to_dict() for request in requests], sort_keys=True)


def requests_from_json(text: str | bytes) -> list[InstancePciRequest]:
    """The inverse of :func:`requests_to_json`, validated."""
    loaded = load_json(text, "stored PCI requests", InvalidPciRequest)
    if not isinstance(loaded, list):
        raise InvalidPciRequest(f"stored PCI requests must be a JSON list, got {type(loaded).__name__}")
    return [InstancePciRequest.from_dict(item) for item in loaded]


# --- flavors -------------------------------------------------------------------

def _parse_count(text: str, name: str, pair: str) -> int:
    count = text.strip()
    # ASCII digits only (str.isdigit() and int() also take '١٢'); and never int() a text beyond
    # Python's 4300-digit limit (a ValueError), nor spend time on one when the limit is lifted.
    digits = count.lstrip("0") if _COUNT_RE.fullmatch(count) else ""
    if not digits or len(digits) > _MAX_COUNT_DIGITS:
        raise InvalidPciRequest(
            f"{ALIAS_EXTRA_SPEC}: count {shown(count)} for alias {shown(name)} in {shown(pair.strip())} "
            "is not a positive integer"
        )
    return int(digits)


def _parse_alias_extra_spec(value: Any) -> list[tuple[str, int]]:
    """``"name:count, name:count"`` -> [(name, count)], rejecting every malformed form.

    A name may appear twice (``"QA:1, QA:2"``): as in Nova, that is two requests.
    """
    if not isinstance(value, str):
        raise InvalidPciRequest(f"{ALIAS_EXTRA_SPEC} must be a string 'name:count[, ...]', got {shown(value)}")
    pairs: list[tuple[str, int]] = []
    for pair in value.split(","):
        parts = pair.split(":")
        if len(parts) != 2 or not parts[0].strip():
            raise InvalidPciRequest(
                f"{ALIAS_EXTRA_SPEC}: {shown(pair.strip())} in {shown(value)} is not 'name:count'"
            )
        name = parts[0].strip()
        count = _parse_count(parts[1], name, pair)
        pairs.append((name, count))
    return pairs


def _extra_specs(flavor: Any) -> Mapping[str, Any]:
    if not isinstance(flavor, Mapping):
        raise InvalidPciRequest(f"flavor must be a mapping with 'extra_specs', got {type(flavor).__name__}")
    specs = flavor.get("extra_specs")
    if specs is None:
        return {}
    if not isinstance(specs, Mapping):
        raise InvalidPciRequest(f"flavor 'extra_specs' must be a mapping, got {type(specs).__name__}")
    for key in specs:
        if isinstance(key, str) and key.startswith(EXTRA_SPEC_PREFIX) and key != ALIAS_EXTRA_SPEC:
            raise InvalidPciRequest(f"unknown key {key!r} in flavor extra specs (only {ALIAS_EXTRA_SPEC!r} exists)")
    return specs


def get_pci_requests_from_flavor(
    flavor: Mapping[str, Any],
    aliases: Mapping[str, Sequence[AliasSpec]],
    affinity_policy: str | None = None,
) -> list[InstancePciRequest]:
    """The requests of ``pci_passthrough:alias`` in ``flavor["extra_specs"]`` ([] when absent).

    Each request gets a fresh ``request_id``.  ``affinity_policy`` (Nova's
    ``hw:pci_numa_affinity_policy``), when given, overrides the aliases' policy.
    """
    specs = _extra_specs(flavor)
    if ALIAS_EXTRA_SPEC not in specs:
        return []
    if affinity_policy is not None and affinity_policy not in NUMA_POLICIES:
        raise InvalidPciRequest(
            f"PCI NUMA affinity policy must be one of {', '.join(NUMA_POLICIES)}, got {shown(affinity_policy)}"
        )
    if not isinstance(aliases, Mapping):
        raise InvalidAlias(f"aliases must map alias names to their alternatives, got {type(aliases).__name__}")
    requests = []
    for name, count in _parse_alias_extra_spec(specs[ALIAS_EXTRA_SPEC]):
        alternatives = aliases.get(name)
        if not alternatives:
            raise AliasNotDefined(f"PCI alias {shown(name)} is not defined")
        if not isinstance(alternatives, Sequence) or not all(isinstance(a, AliasSpec) for a in alternatives):
            raise InvalidAlias(f"alias {shown(name)}: alternatives must be a list of AliasSpec (see parse_aliases)")
        requests.append(
            InstancePciRequest(
                count=count,
                spec=[alternative.to_spec() for alternative in alternatives],
                alias_name=name,
                numa_policy=affinity_policy or alternatives[0].numa_policy,
                request_id=str(uuid.uuid4()),
                source=SOURCE_FLAVOR,
            )
        )
    return requests


# --- instance metadata -----------------------------------------------------------

def save_flavor_pci_info(
    metadata: MutableMapping[str, str],
    flavor: Mapping[str, Any],
    aliases: Mapping[str, Sequence[AliasSpec]],
    prefix: str = "",
) -> None:
    """Store the flavor's requests as JSON under ``f"{prefix}pci_requests"`` (only if there are any)."""
    requests = get_pci_requests_from_flavor(flavor, aliases)
    if requests:
        metadata[f"{prefix}{METADATA_KEY}"] = requests_to_json(requests)


def _system_metadata(instance: Mapping[str, Any]) -> Mapping[str, Any]:
    """``system_metadata`` as a dict; the old DB form, a list of ``{"key", "value"}`` rows, is accepted."""
    meta = instance["system_metadata"]
    if isinstance(meta, Mapping):
        return meta
    if isinstance(meta, list) and all(isinstance(row, Mapping) and isinstance(row.get("key"), str) for row in meta):
        return {row["key"]: row.get("value") for row in meta}
    raise InvalidPciRequest(f"instance 'system_metadata' must be a mapping, got {type(meta).__name__}")


def get_instance_pci_requests(instance: Mapping[str, Any], prefix: str = "") -> list[InstancePciRequest]:
    """The requests stored with the instance under ``prefix`` ([] when there are none)."""
    if not isinstance(instance, Mapping) or "system_metadata" not in instance:
        return []
    key = f"{prefix}{METADATA_KEY}"
    stored = _system_metadata(instance).get(key)
    if not stored:
        return []
    try:
        return requests_from_json(stored)
    except InvalidPciRequest as exc:
        raise InvalidPciRequest(f"system_metadata[{key!r}]: {exc}") from None


def delete_flavor_pci_info(metadata: MutableMapping[str, str], *prefixes: str) -> None:
    """Drop the stored requests under each prefix (absent keys are fine)."""
    for prefix in prefixes:
        metadata.pop(f"{prefix}{METADATA_KEY}", None)


# --- matching --------------------------------------------------------------------

def values_match(have: Any, wanted: Any) -> bool:
    """One spec value against a device's (Nova's ``pci_device_prop_match``).

    Strings compare without regard to case (port profiles vs operator
    config); a list asks that every item be in the device's list (a string
    against a list, or a list against a string, never matches).
    """
    if have == wanted:
        return True
    if isinstance(wanted, str):
        return isinstance(have, str) and have.lower() == wanted.lower()
    if isinstance(wanted, list):
        return isinstance(have, list) and all(item in have for item in wanted)
    return False


def request_matches(spec_alternatives: Iterable[Mapping[str, Any]], device: Any) -> bool:
    """Does ``device`` satisfy one of the alternatives?

    ``device`` is a dict with ``vendor_id``, ``product_id``, ``dev_type`` and
    ``tags`` (a dict), or an object with those attributes.  ``vendor_id``,
    ``product_id`` and ``dev_type`` are compared with the device's own
    fields, every other key with its tags; string values compare without
    regard to case and a list-valued spec is a subset test, as in Nova
    (:func:`values_match`).
    """
    if isinstance(device, Mapping):
        fields: Mapping[str, Any] = device
        tags = device.get("tags") or {}
    else:
        fields = {key: getattr(device, key, None) for key in _DEVICE_FIELDS}
        tags = getattr(device, "tags", None) or {}
    for alternative in spec_alternatives:
        for key, wanted in alternative.items():
            have = fields.get(key) if key in _DEVICE_FIELDS else tags.get(key)
            if not values_match(have, wanted):
                break
        else:
            return True
    return False

