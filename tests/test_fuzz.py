"""Fuzzing the parsers: for ANY input they return a result or raise a kvmslots error.

Every parser of outside input (QEMU's ``query-pci`` / ``info pci``, device ids and
properties, device specs, Nova's ``device_spec``, aliases and flavor requests, the
hypervisor's device list, exported runtime documents) is fed arbitrary JSON-like values,
arbitrary text, mutated real captures (``tests/data``) and targeted nasties: numbers
longer than Python's 4300-digit ``int()`` limit, non-ASCII digits (``'²'``, ``'١٢'``),
infinities, and deep nesting.  Whatever escapes must be a :class:`KvmSlotsError`;
a ``TypeError``, ``ValueError``, ``RecursionError``... failing the test is a bug.

The budget comes from the Hypothesis profile selected in ``conftest.py``
(``KVMSLOTS_FUZZ_PROFILE``: ``ci`` by default, ``fuzz`` for a long random hunt).
The last section holds deterministic tests of the cases the issue names.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from kvmslots import capabilities, devid, model, pciview, store
from kvmslots.errors import (
    InvalidAlias,
    InvalidDeviceId,
    InvalidDevicesJson,
    InvalidDeviceSpec,
    InvalidPciAddress,
    InvalidPciRequest,
    KvmSlotsError,
    MonitorError,
    StateImportError,
)
from kvmslots.model import machine_family
from kvmslots.pci import address, devspec, request
from kvmslots.pci.device import HYPERVISOR_FIELDS, device_from_hypervisor
from kvmslots.pci.tracker import PciDevTracker

FUZZ = settings(settings.get_profile("kvmslots-fuzz"))

DATA = Path(__file__).parent / "data"
QUERY_PCI = json.loads((DATA / "query-pci.json").read_text())
INFO_PCI = (DATA / "info-pci.txt").read_text()


def survives(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``parse(*args)``: its result, or None when it raised a kvmslots error.

    Any other exception propagates and fails the test.
    """
    name = getattr(parse, "__name__", "parse")
    try:
        result = parse(*args, **kwargs)
    except KvmSlotsError as exc:
        outcome = type(exc).__name__
        result = None
    else:
        outcome = "parsed"
    if currently_in_test_context():  # --hypothesis-show-statistics shows how often each outcome came
        event(f"{name}: {outcome}")
    return result


# --- nasty values ------------------------------------------------------------------------

BIG = 10**5000  # str() and repr() of it raise ValueError (Python's 4300-digit limit)
NASTY_NUMBERS = [
    0, 1, -1, 7, 8, 31, 32, 255, 256, 0xFFFF, 0x10000, 2**31, 2**63, 2**64, -(2**63),
    True, False, 0.0, 1.0, 3.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"),
]


def huge_int(sign: int) -> int:
    return sign * BIG


def repeat(text: str, times: int, tail: str = "") -> str:
    return text * times + tail


# Big values come from builds(), never from sampled_from(): Hypothesis repr()s the elements of
# a sampled_from (a repr() of BIG raises) and prints builds() calls compactly in its reports.
huge_ints = st.builds(huge_int, st.sampled_from([1, -1]))
long_digit_texts = st.builds(repeat, st.sampled_from(["9", "0", "1"]), st.sampled_from([20, 4301, 5000]),
                             st.sampled_from(["", "1"]))
long_texts = long_digit_texts | st.builds(
    repeat, st.sampled_from(["x", "(", "é", "[", '{"a":', "Bus 0, "]), st.sampled_from([300, 3000, 10_000])
)
DIGIT_TEXTS = [
    "²", "١٢", "٣", "𝟗", "߁", "0", "1", "3", "7", "8", "31", "32", "255", "256", "-1", "+1", " 1", "1 ",
    "0x1f", "1e3", "1.0", "", "ff", "FF", "fff", "ffff1",
]
NASTY_TEXTS = DIGIT_TEXTS + [
    " ", "\x00", "\n", "\r\n", "\u2028", "\x85", "\t", "*", ".*", "a{4294967296}", "(?P<", "[", "\\",
    "[[", "{", '"', "K", "ſ", "İ", "ǅ", "\ud800", "null", "true", "[]", "{}", "Infinity", "NaN", "-Infinity",
]

nasty_numbers = st.sampled_from(NASTY_NUMBERS) | huge_ints
nasty_texts = st.sampled_from(NASTY_TEXTS) | long_texts
nasty_scalars = nasty_numbers | nasty_texts
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | nasty_scalars
)
digit_texts = (
    st.sampled_from(DIGIT_TEXTS) | long_digit_texts | st.integers(-5, 70_000).map(str)
    | st.text("0123456789²١٢", max_size=6)
)


class _Shown:
    """How Hypothesis prints a deeply nested value in a report: ``nested(depth, leaf, kind)``.

    Its own pretty printer recurses and would fail on the very values we generate; repr()
    stays list's or dict's, so the parsers see exactly what json.loads would give them.
    """

    depth: int
    leaf: Any
    kind: str

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        try:
            leaf = repr(self.leaf)
        except ValueError:
            leaf = "huge_int(...)"
        printer.text(f"nested({self.depth}, {leaf[:60]}, {self.kind!r})")


class DeepList(_Shown, list):
    pass


class DeepDict(_Shown, dict):
    pass


def nested(depth: int, leaf: Any = None, kind: str = "list") -> Any:
    """``leaf`` wrapped ``depth`` times in lists or dicts (built iteratively: no recursion here)."""
    if depth <= 0:
        return leaf
    value = leaf
    for _ in range(depth - 1):
        value = [value] if kind == "list" else {"a": value}
    outer: Any = DeepList([value]) if kind == "list" else DeepDict({"a": value})
    outer.depth, outer.leaf, outer.kind = depth, leaf, kind
    return outer


deep_values = st.builds(nested, st.integers(0, 5000), scalars, st.sampled_from(["list", "dict"]))


def json_like(keys: list[str] | tuple[str, ...] = (), words: list[Any] | tuple[Any, ...] = (), max_leaves: int = 25):
    """Arbitrary JSON-like values; dict keys and leaves lean towards the parser's vocabulary."""
    key = st.text(max_size=8)
    if keys:
        key = st.sampled_from(list(keys)) | key
    leaf = scalars
    if words:
        leaf = st.sampled_from(list(words)) | leaf
    return st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=6),
        max_leaves=max_leaves,
    ) | deep_values


def dumps(value: Any) -> str:
    """JSON text of a generated value (values JSON cannot hold give a fixed text)."""
    try:
        return json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        return '["not serialisable"]'


def deep_json_text(depth: int, kind: str) -> str:
    opener, closer = {"list": ("[", "]"), "dict": ('{"a":', "}"), "open": ("[", "")}[kind]
    return opener * depth + ("1" if kind != "open" else "") + closer * depth


deep_texts = st.builds(deep_json_text, st.integers(0, 250_000), st.sampled_from(["list", "dict", "open"]))


def json_texts(values: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """JSON (or almost JSON) text: dumped values, truncated dumps, arbitrary text, deep nesting."""
    dumped = values.map(dumps)
    return (
        dumped
        | st.tuples(dumped, st.integers(0, 50)).map(lambda t: t[0][: t[1]])
        | st.text()
        | deep_texts
        | st.builds(str.format, st.sampled_from(['{{"count": {}}}', "[{}]", "-{}.5e3", "{}"]), long_digit_texts)
        | st.sampled_from(["1e999999", "[NaN]", "[Infinity]"])
    )


# --- mutated captures ----------------------------------------------------------------------

def _places(holder: list[Any]) -> list[tuple[Any, Any]]:
    """Every (container, key) in ``holder`` (iteratively), the root included."""
    places: list[tuple[Any, Any]] = []
    todo: list[Any] = [holder]
    while todo:
        container = todo.pop()
        keys = list(container) if isinstance(container, dict) else range(len(container))
        for key in keys:
            places.append((container, key))
            if isinstance(container[key], (dict, list)):
                todo.append(container[key])
    return places


@st.composite
def mutated(draw: st.DrawFn, original: Any, values: st.SearchStrategy[Any]) -> Any:
    """A deep copy of ``original`` with up to four random edits."""
    holder = [copy.deepcopy(original)]
    for _ in range(draw(st.integers(0, 4))):
        places = _places(holder)
        container, key = places[draw(st.integers(0, len(places) - 1))]
        action = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "duplicate", "nest"]))
        if action == "replace":
            container[key] = draw(values)
        elif action == "delete" and container is not holder:
            del container[key]
        elif action == "wrap":
            container[key] = [container[key]] if draw(st.booleans()) else {"a": container[key]}
        elif action == "duplicate" and isinstance(container, list):
            container.insert(key, container[key])  # the same object twice (a deep copy could recurse too deep)
        elif action == "nest":
            container[key] = nested(draw(st.integers(1, 400)), container[key], draw(st.sampled_from(["list", "dict"])))
    return holder[0]


_DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)


@st.composite
def mutated_text(draw: st.DrawFn, original: str, line: st.SearchStrategy[str]) -> str:
    """``original`` with one to four line edits: numbers replaced, lines dropped, doubled or inserted."""
    lines = original.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, max(len(lines) - 1, 0)))
        action = draw(st.sampled_from(["number", "number", "delete", "duplicate", "insert", "splice"]))
        if not lines:
            lines.append(draw(line))
        elif action == "number":
            numbers = list(_DIGITS_RE.finditer(lines[index]))
            if numbers:
                m = numbers[draw(st.integers(0, len(numbers) - 1))]
                lines[index] = lines[index][: m.start()] + draw(digit_texts) + lines[index][m.end():]
        elif action == "delete":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, lines[index])
        elif action == "insert":
            lines.insert(index, draw(line))
        else:
            cut = draw(st.integers(0, len(lines[index])))
            lines[index] = lines[index][:cut] + draw(st.text(max_size=10) | nasty_texts)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


# --- QEMU's live view: pciview ---------------------------------------------------------

QUERY_PCI_KEYS = [
    "return", "bus", "devices", "slot", "function", "qdev_id", "id", "vendor", "device", "class_info",
    "desc", "class", "pci_bridge", "secondary", "number", "subordinate", "regions", "irq",
]
QUERY_PCI_WORDS = ["br1", "pci.0", "", 0, 1, 3, 5, 6]
query_pci_values = json_like(QUERY_PCI_KEYS, QUERY_PCI_WORDS)


def _check_view(view: pciview.PciOccupancy) -> None:
    """What comes out is sane: ints in PCI ranges, strings, hashable functions."""
    for function in view.functions:
        hash(function)
        assert type(function.bus) is int and 0 <= function.bus <= 255
        assert type(function.slot) is int and 0 <= function.slot <= 31
        assert type(function.function) is int and 0 <= function.function <= 7
        assert isinstance(function.qdev_id, str) and isinstance(function.description, str)
        for value, limit in ((function.vendor, 0xFFFF), (function.device, 0xFFFF), (function.secondary_bus, 255)):
            assert value is None or (type(value) is int and 0 <= value <= limit)
        assert function.address
    for name in ("pci.0", "br1", "rng1", ""):
        view.is_pcie_port(name)
        view.has(name)
        survives(view.bus_number, name)


@FUZZ
@given(st.one_of(
    query_pci_values, mutated(QUERY_PCI, query_pci_values), mutated({"return": QUERY_PCI}, query_pci_values)
))
def test_parse_query_pci_raises_only_kvmslots_errors(reply):
    view = survives(pciview.parse_query_pci, reply)
    if view is not None:
        _check_view(view)


info_pci_lines = (
    st.builds("  Bus {}, device {}, function {}:".format, digit_texts, digit_texts, digit_texts)
    | st.builds("      secondary bus {}.".format, digit_texts)
    | st.builds('      id "{}"'.format, st.text(max_size=10))
    | st.builds("    Class 0255: PCI device {}:{}".format, st.text("0123456789abcdefABCDEF²١", max_size=5),
                st.text("0123456789abcdef", max_size=5))
    | st.text(max_size=30)
    | nasty_texts
)


@FUZZ
@given(st.one_of(mutated_text(INFO_PCI, info_pci_lines), st.lists(info_pci_lines, max_size=12).map("\n".join),
                 st.text(), scalars))
def test_parse_info_pci_raises_only_kvmslots_errors(text):
    view = survives(pciview.parse_info_pci, text)
    if view is not None:
        _check_view(view)


# --- device ids, properties, device specs: devid / model ---------------------------------

UUID = "9f3c2a1b-5d6e-4f70-8192-a3b4c5d6e7f8"
device_ids = (
    st.builds("{}-{}-pci-{}".format, st.from_regex(r"[a-z][a-z0-9]{0,17}", fullmatch=True),
              st.from_regex(r"[0-9a-f]{8}", fullmatch=True), st.integers(0, 40).map(str) | digit_texts)
    | st.builds("{}-{}-pci-{}".format, st.sampled_from(["nic", "rng", "a", "x" * 17, "Nic", "n-c"]),
                st.sampled_from(["9f3c2a1b", "9F3C2A1B", "9f3c2a1", "٩f3c2a1b"]), digit_texts)
    | st.text()
    | scalars
    | json_like(max_leaves=5)
)


@FUZZ
@given(device_ids)
def test_parse_device_id_raises_only_kvmslots_errors(text):
    parsed = survives(devid.parse_device_id, text)
    if parsed is not None:
        dev_type, uuid8, slot = parsed
        assert 0 <= slot <= 31 and isinstance(dev_type, str) and isinstance(uuid8, str)


PROP_NAMES = ["netdev", "mac", "host", "romfile", "x-foo", "id", "bus", "vectors", "Bad", "a" * 70]
prop_values = json_like(PROP_NAMES, ["net0", "52:54:00:12:34:56", "0000:81:00.1", "a,b", "\x7f"], max_leaves=10)
drivers = st.sampled_from(["virtio-net-pci", "vfio-pci", "e1000", "", "VFIO"]) | scalars | json_like(max_leaves=4)


@FUZZ
@given(prop_values, drivers)
def test_validate_props_raises_only_kvmslots_errors(props, driver):
    survives(devid.validate_props, props, driver)


def valid_or(valid: Any, fuzzed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Half the time the valid value, so that the other arguments' checks are reached too."""
    return st.just(valid) | fuzzed


@FUZZ
@given(
    valid_or(UUID, st.sampled_from([UUID.upper(), "00000000-0000-0000-0000-000000000000", "٩" * 8 + UUID[8:]])
             | scalars),
    valid_or("nic", st.sampled_from(["rng", "x" * 17, "Nic"]) | scalars),
    valid_or("virtio-net-pci", drivers),
    valid_or({"netdev": "net0"}, prop_values),
    valid_or("pci.0", st.sampled_from(["br1", "1bus", "pci 0"]) | scalars),
    valid_or(4, st.none() | st.integers(-2, 40) | nasty_numbers | scalars),
)
def test_device_spec_raises_only_kvmslots_errors(uuid, dev_type, driver, props, bus, slot):
    survives(model.DeviceSpec, uuid, dev_type, driver, props, bus, slot)


# --- the runtime document: store.parse_export --------------------------------------------

EXPORT_V1 = {
    "format": store.EXPORT_FORMAT,
    "version": 1,
    "vm": {"name": "vm1", "machine": "pc", "mask": "1111" + "0" * 28, "bus_masks": {"br1": "1" + "0" * 31}},
    "devices": [
        {"uuid": UUID, "type": "nic", "driver": "virtio-net-pci", "props": {"netdev": "net0"}, "bus": "pci.0",
         "slot": 4, "state": "attached", "id": "nic-9f3c2a1b-pci-4"},
        {"uuid": "0c1d2e3f-0000-4000-8000-000000000001", "type": "rng", "driver": "virtio-rng-pci", "props": {},
         "bus": "br1", "slot": 3, "state": "planned", "id": "rng-0c1d2e3f-pci-3"},
    ],
}
EXPORT = {
    "format": store.EXPORT_FORMAT,
    "version": store.EXPORT_VERSION,
    "vm": {"name": "vm2", "machine": "q35", "mask": "11" + "0" * 29 + "1", "bus_masks": {}, "hotplug_ports": 1,
           "spare_bridge": False},
    "controllers": [
        {"id": "pcie-port-1", "kind": "pcie-root-port", "bus": "pcie.0", "slot": 2, "function": 0, "chassis": 1},
        {"id": "pcie-port-2", "kind": "pcie-root-port", "bus": "pcie.0", "slot": 2, "function": 1, "chassis": 2},
    ],
    "devices": [
        {"uuid": UUID, "type": "nic", "driver": "virtio-net-pci", "props": {"netdev": "net0"}, "bus": "pcie-port-1",
         "slot": 0, "function": 0, "multifunction": True, "state": "attached", "id": "nic-9f3c2a1b-pci-0",
         "id_given": False},
        {"uuid": "0c1d2e3f-0000-4000-8000-000000000001", "type": "rng", "driver": "virtio-rng-pci", "props": {},
         "bus": "pcie-port-1", "slot": 0, "function": 1, "multifunction": False, "state": "attached",
         "id": "rng-0c1d2e3f", "id_given": True},  # as another manager (Ganeti 2.16+) named it
    ],
}
EXPORT_KEYS = ["format", "version", "vm", "devices", "name", "machine", "mask", "bus_masks", "uuid", "type",
               "driver", "props", "bus", "slot", "state", "id", "controllers", "kind", "function", "chassis",
               "multifunction", "hotplug_ports", "spare_bridge", "id_given"]
export_values = json_like(EXPORT_KEYS, [store.EXPORT_FORMAT, store.EXPORT_VERSION, 1, "attached", "pci.0", 4, UUID,
                                        "pcie-root-port", "pcie-port-1"])


def test_the_export_samples_are_valid():
    vm, controllers, devices = store.parse_export(EXPORT)
    assert vm.name == "vm2" and len(controllers) == 2 and [d.function for d in devices] == [0, 1]
    assert [d.qemu_id for d in devices] == ["nic-9f3c2a1b-pci-0", "rng-0c1d2e3f"]
    vm, controllers, devices = store.parse_export(EXPORT_V1)
    assert vm.name == "vm1" and controllers == [] and len(devices) == 2


@FUZZ
@given(st.one_of(export_values, mutated(EXPORT, export_values), json_texts(mutated(EXPORT, export_values)),
                 mutated(EXPORT_V1, export_values),
                 json_texts(export_values).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary()))
def test_parse_export_raises_only_kvmslots_errors(document):
    survives(store.parse_export, document)


# --- what QEMU says of itself: capabilities.parse_info_version / parse_machine_help, machine names ------

MACHINE_HELP = (
    "Supported machines are:\n"
    "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
    "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
    "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
)


@FUZZ
@given(st.one_of(st.text(), scalars, mutated_text("7.2.22Debian 1:7.2+dfsg-7\r\n", st.text(max_size=4)),
                 mutated_text(MACHINE_HELP, st.text(max_size=8))))
def test_qemu_self_descriptions_parse_or_say_no(text):
    version = capabilities.parse_info_version(text)
    assert version is None or all(isinstance(n, int) and n >= 0 for n in version)
    if isinstance(text, str):
        machines = capabilities.parse_machine_help(text)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in machines.items())
        for name in list(machines)[:20]:
            survives(machine_family, name)


@FUZZ
@given(st.one_of(st.sampled_from(["pc", "q35", "pc-q35-7.2", "microvm"]), st.text(max_size=20), scalars),
       st.one_of(st.integers(-5, 300), scalars), st.one_of(st.booleans(), scalars),
       st.one_of(st.none(), st.integers(-3, 40), scalars), st.lists(st.integers(0, 3), max_size=10))
def test_vm_specs_and_groups_raise_only_kvmslots_errors(machine, ports, spare, reserve, members):
    survives(model.VMSpec, "vm1", machine, hotplug_ports=ports, spare_bridge=spare, reserve_slots=reserve)
    specs = [model.DeviceSpec(f"0c1d2e3f-0000-4000-8000-00000000000{m}", "dev", "pci-testdev") for m in members]
    survives(model.DeviceGroup, tuple(specs))
    survives(model.DeviceGroup, specs, machine if isinstance(machine, str) else None, ports)


# --- host PCI addresses: pci.address -------------------------------------------------------

address_texts = (
    st.builds("{:04x}:{:02x}:{:02x}.{:x}".format, st.integers(0, 0x10000), st.integers(0, 0x100), st.integers(0, 0x20),
              st.integers(0, 8))
    | st.builds("{}:{}:{}.{}".format, st.sampled_from(["0000", "ffff", "10000", "٠٠٠٠", ""]) | digit_texts,
              st.sampled_from(["0a", "ff", "100", "²"]) | digit_texts,
              st.sampled_from(["00", "1f", "20", "١٢"]) | digit_texts,
              st.sampled_from(["0", "7", "8", "²"]) | digit_texts)
    | st.text()
    | scalars
    | json_like(max_leaves=4)
)


@FUZZ
@given(address_texts, nasty_numbers | scalars, nasty_numbers, st.integers(-1, 300),
       st.integers(-1, 9))
def test_address_parsing_raises_only_kvmslots_errors(text, n1, n2, n3, n4):
    parsed = survives(address.parse_address, text)
    if parsed is not None:
        assert address.parse_address(str(parsed)) == parsed
    survives(address.canonical_address, text)
    survives(address.validate_pci_id, text)
    survives(address.validate_pci_id, text, "vendor_id", InvalidDevicesJson)
    survives(address.PciAddress, n1, n2, n3, n4)
    survives(address.PciAddress, n3, n3, n3, n4)


# --- Nova's device_spec: pci.devspec -------------------------------------------------------

DEVSPEC_KEYS = ["address", "devname", "vendor_id", "product_id", "physical_network", "remote_managed", "trusted",
                "dev_type", "domain", "bus", "slot", "function", "Bad Key"]
REGEX_TEXTS = (
    st.sampled_from([".*", "0[1-2]", "[2-7]", "02", "0a", "*", "(", "a{4294967296}", "(?P<", "[", "\\", "(a*)*$",
                     "0{99999}"])
    | st.builds(repeat, st.sampled_from(["(", "(?:", "[", "a{99}"]), st.sampled_from([10, 3000]))
    | st.text("()[]{}*+?.|\\^$0-9afAF,-<>P", max_size=12)
)
GLOB_TEXTS = st.builds(
    "{}:{}:{}.{}".format, st.sampled_from(["*", "", "0000", "10000"]) | digit_texts,
    st.sampled_from(["*", "0a", "100", ""]) | digit_texts, st.sampled_from(["*", "00", "20"]) | digit_texts,
    st.sampled_from(["*", "0", "8", ""]) | digit_texts,
) | st.text(":.*0123456789abcdef²١", max_size=14)
devspec_words = [
    "*", "8086", "15b3", "0000:81:00.1", "*:0a:00.*", "eth0", "physnet1", "true", "false", "yes", "type-VF",
]
devspec_values = json_like(DEVSPEC_KEYS, devspec_words)
devspec_entries = (
    st.fixed_dictionaries({}, optional={
        "address": GLOB_TEXTS
        | st.dictionaries(st.sampled_from(["domain", "bus", "slot", "function", "x"]), REGEX_TEXTS)
        | st.lists(GLOB_TEXTS | scalars, max_size=3) | scalars,
        "devname": st.sampled_from(["eth0", "e" * 16, "a b", ""]) | scalars,
        "vendor_id": st.sampled_from(["8086", "*", "80EE", " 71 ", "10000"]) | digit_texts | scalars,
        "product_id": st.sampled_from(["0071", "*"]) | digit_texts | scalars,
        "physical_network": st.sampled_from(["physnet1"]) | scalars,
        "remote_managed": st.sampled_from(["true", "false", "maybe"]) | scalars,
    })
    | devspec_values
)
REAL_DEVSPECS = [
    '{"address":"*:0a:00.*","physical_network":"physnet1"}',
    {"address": {"domain": ".*", "bus": "02", "slot": "0[1-2]", "function": "[2-7]"}},
    {"address": ["0000:81:00.1", "0000:81:00.2"], "physical_network": "physnet1"},
    {"vendor_id": "1137", "product_id": "0071"},
    '[{"devname": "eth0", "physical_network": "physnet1"}, {"vendor_id": "15b3", "remote_managed": "true"}]',
]
SAMPLE_DEVICES = [
    {"address": "0000:02:01.2", "vendor_id": "8086", "product_id": "1520", "dev_type": "type-PCI"},
    {"address": "0000:81:00.1", "vendor_id": "15b3", "product_id": "1018", "dev_type": "type-VF",
     "parent_addr": "0000:81:00.0", "devname": "eth0", "capabilities": {"vpd": {"card_serial_number": "X"}}},
]


@FUZZ
@given(st.one_of(
    st.lists(devspec_entries | devspec_entries.map(dumps) | st.lists(devspec_entries, max_size=2), max_size=4),
    json_texts(st.lists(devspec_entries, max_size=3)),
    mutated(REAL_DEVSPECS, devspec_values),
    devspec_values,
))
def test_whitelist_from_config_raises_only_kvmslots_errors(config):
    whitelist = survives(devspec.Whitelist.from_config, config)
    if whitelist is not None:
        for device in SAMPLE_DEVICES:
            survives(whitelist.match, device)


@FUZZ
@given(devspec_entries, GLOB_TEXTS | scalars)
def test_device_spec_entry_and_glob_raise_only_kvmslots_errors(entry, glob):
    survives(devspec.DeviceSpecEntry.from_dict, entry)
    if isinstance(glob, str):
        survives(devspec.parse_glob, glob)


@FUZZ
@given(json_like(list(HYPERVISOR_FIELDS) + ["capabilities", "vpd"], ["0000:81:00.1", "8086", "type-VF"]))
def test_whitelist_match_of_any_device_raises_only_kvmslots_errors(device):
    whitelist = devspec.Whitelist.from_config(REAL_DEVSPECS)
    survives(whitelist.match, device)


# --- aliases and flavor requests: pci.request -------------------------------------------

ALIAS_KEYS = ["name", "vendor_id", "product_id", "device_type", "numa_policy", "capability_type", "live_migratable",
              "physical_network", "dev_type", "resource_class", "Bad"]
alias_words = ["QAT", "GPU", "a1", "8086", "0443", "10DE", "type-PCI", "type-VF", "required", "legacy", "pci", "yes"]
alias_values = json_like(ALIAS_KEYS, alias_words)
alias_entries = st.fixed_dictionaries(
    {"name": st.sampled_from(["QAT", "GPU", "a1", " a1 ", "a:b", "x" * 300, ""]) | scalars},
    optional={
        "vendor_id": st.sampled_from(["8086", "10DE", "zz"]) | digit_texts | scalars,
        "product_id": st.sampled_from(["0443", "1db4"]) | digit_texts | scalars,
        "device_type": st.sampled_from(["type-PCI", "type-VF", "type-PF"]) | scalars,
        "numa_policy": st.sampled_from(["required", "legacy", "preferred", "socket"]) | scalars,
        "physical_network": st.sampled_from(["physnet1"]) | scalars,
        "live_migratable": st.sampled_from(["yes", "no", "maybe"]) | scalars,
    },
) | alias_values
REAL_ALIASES = [
    '{"name":"QAT","vendor_id":"8086","product_id":"0443","device_type":"type-PCI","numa_policy":"required"}',
    {"name": "GPU", "vendor_id": "10de", "product_id": "1db4"},
    {"name": "a1", "vendor_id": "8086", "product_id": "154c", "device_type": "type-VF",
     "physical_network": "physnet1"},
]
ALIASES = request.parse_aliases(REAL_ALIASES)
alias_configs = st.one_of(
    st.lists(alias_entries | alias_entries.map(dumps) | st.lists(alias_entries, max_size=2), max_size=4),
    json_texts(st.lists(alias_entries, max_size=3)),
    mutated(REAL_ALIASES, alias_values),
    alias_values,
)


@FUZZ
@given(alias_configs, alias_entries | json_texts(alias_entries))
def test_parse_aliases_raises_only_kvmslots_errors(config, one):
    survives(request.parse_aliases, config)
    survives(request.parse_alias, one)


extra_spec_texts = (
    st.lists(st.tuples(st.sampled_from(["QAT", "GPU", "a1", "nope", "", " a1 "]), digit_texts), min_size=1, max_size=4)
    .map(lambda pairs: ", ".join(f"{name}:{count}" for name, count in pairs))
    | st.text(max_size=30)
    | scalars
)
flavors = (
    st.builds(lambda v: {"extra_specs": {"pci_passthrough:alias": v}}, extra_spec_texts)
    | st.builds(lambda k, v: {"extra_specs": {k: v}},
                st.sampled_from(["pci_passthrough:alias", "pci_passthrough:x", "hw:x"]), scalars)
    | json_like(["extra_specs", "pci_passthrough:alias"], ["QAT:1", "a1:2"])
)
alias_maps = (
    st.just(ALIASES)
    | alias_configs.map(lambda config: survives(request.parse_aliases, config) or ALIASES)
    | json_like(["QAT", "GPU", "a1"], max_leaves=6)
)


@FUZZ
@given(flavors, alias_maps, st.none() | st.sampled_from(["required", "legacy", "bogus"]) | scalars)
def test_flavor_requests_raise_only_kvmslots_errors(flavor, aliases, policy):
    requests = survives(request.get_pci_requests_from_flavor, flavor, aliases, policy)
    if requests:
        assert request.requests_from_json(request.requests_to_json(requests)) == requests
    metadata: dict[str, str] = {}
    survives(request.save_flavor_pci_info, metadata, flavor, aliases)


REQUEST_KEYS = ["count", "spec", "alias_name", "numa_policy", "request_id", "source", "vendor_id", "product_id",
                "dev_type", "pci_requests", "system_metadata", "key", "value"]
request_values = json_like(REQUEST_KEYS, ["8086", "type-VF", "flavor", "required", UUID, 1, 2])
REAL_REQUEST = {"count": 1, "spec": [{"vendor_id": "8086", "product_id": "0443", "dev_type": "type-PCI"}],
                "alias_name": "QAT", "numa_policy": "required", "request_id": UUID, "source": "flavor"}


@FUZZ
@given(st.one_of(request_values, mutated(REAL_REQUEST, request_values), mutated([REAL_REQUEST], request_values)),
       json_texts(mutated([REAL_REQUEST], request_values)))
def test_stored_requests_raise_only_kvmslots_errors(raw, text):
    survives(request.InstancePciRequest.from_dict, raw)
    survives(request.InstancePciRequest.from_json, text)
    survives(request.requests_from_json, text)
    for instance in ({"system_metadata": {"pci_requests": text}}, {"system_metadata": [{"key": "pci_requests",
                                                                                      "value": text}]},
                     {"system_metadata": raw}, raw):
        survives(request.get_instance_pci_requests, instance)


# --- the hypervisor's device list: pci.device and the tracker ------------------------------

DEVICE = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
          "numa_node": 0, "dev_id": "pci_0000_81_00_0", "label": "label_8086_1572", "iommu_group": 4}
VF = {"address": "0000:81:02.0", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
      "parent_addr": "0000:81:00.0", "numa_node": -1, "capabilities": {"vpd": {"card_serial_number": "X"}}}
device_words = ["0000:81:00.0", "0000:81:02.0", "8086", "154c", "type-PF", "type-VF", "type-PCI", -1, 0, 4]
device_values = json_like(list(HYPERVISOR_FIELDS) + ["capabilities", "vpd", "card_serial_number", "compute_node_id",
                                                     "extra_info"], device_words)
device_lists = st.one_of(
    mutated([DEVICE, VF], device_values),
    st.lists(mutated(DEVICE, device_values) | device_values, max_size=4),
    device_values,
)
WHITELIST_CONFIGS: list[list[dict[str, str]]] = [
    [{}], [{"vendor_id": "8086", "remote_managed": "true"}], [{"address": "0000:81:00.0", "physical_network": "p"}]
]
WHITELISTS = [devspec.Whitelist.from_config(config) for config in WHITELIST_CONFIGS]


@FUZZ
@given(device_values | mutated(DEVICE, device_values))
def test_device_from_hypervisor_raises_only_kvmslots_errors(raw):
    survives(device_from_hypervisor, raw)


@FUZZ
@given(st.one_of(device_lists, json_texts(device_lists),
                 json_texts(device_lists).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       st.sampled_from(range(len(WHITELISTS))))
def test_tracker_devices_json_raises_only_kvmslots_errors(devices_json, which):
    with tempfile.TemporaryDirectory() as state_dir:
        with store.Store(state_dir) as db:
            tracker = PciDevTracker(db, WHITELISTS[which])
            survives(tracker.update_devices_from_hypervisor_resources, devices_json)
            # and again, through the tracker's cache of records it has seen
            survives(tracker.update_devices_from_hypervisor_resources, devices_json)


# --- the cases the issue names, deterministically ----------------------------------------------

def short(value: Any) -> str:
    """A test id for a parameter that may be a 5000-digit number or text."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"int_of_{value.bit_length()}_bits"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}..._{len(text)}_chars"


def bridges(depth: int, secondary: Callable[[int], int] = lambda level: 1) -> list[dict[str, Any]]:
    """A query-pci reply with ``depth`` pci-bridges nested in one another (built iteratively)."""
    devices: list[dict[str, Any]] = [{"bus": 1, "slot": 3, "function": 0, "qdev_id": "leaf"}]
    for level in range(depth, 0, -1):
        devices = [{"bus": 0, "slot": 5, "function": 0, "qdev_id": f"br{level}",
                    "pci_bridge": {"bus": {"number": 0, "secondary": secondary(level), "subordinate": 0},
                                   "devices": devices}}]
    return [{"bus": 0, "devices": devices}]


def test_100000_nested_bridges_are_refused_without_recursion():
    with pytest.raises(MonitorError, match="nest"):
        pciview.parse_query_pci(bridges(100_000))


def test_bridge_nesting_stops_where_pci_runs_out_of_buses():
    view = pciview.parse_query_pci(bridges(255))  # 256 buses: the root bus and 255 behind bridges
    assert len(view.functions) == 256
    with pytest.raises(MonitorError, match="nest"):
        pciview.parse_query_pci(bridges(256))


@pytest.mark.parametrize("field", ["bus", "slot", "function"])
@pytest.mark.parametrize("value", ["²", "١٢", "12", BIG, float("inf"), float("nan"), True, -1, 1.0, [1], None],
                         ids=short)
def test_query_pci_numbers_must_be_ints_in_range(field, value):
    reply = [{"bus": 0, "devices": [dict({"bus": 0, "slot": 3, "function": 0}, **{field: value})]}]
    with pytest.raises(MonitorError):
        pciview.parse_query_pci(reply)


@pytest.mark.parametrize("device", [
    {"id": {"vendor": [1]}}, {"id": {"device": "x"}}, {"id": {"vendor": 0x10000}}, {"id": {"vendor": True}},
    {"qdev_id": ["br1"]}, {"qdev_id": 5}, {"class_info": {"desc": 5}},
    {"pci_bridge": {"bus": {"secondary": "1"}}}, {"pci_bridge": {"bus": {"secondary": 256}}},
    {"pci_bridge": {"bus": {"secondary": 1}, "devices": "x"}},
], ids=short)
def test_query_pci_fields_are_type_checked(device):
    reply = [{"bus": 0, "devices": [dict({"bus": 0, "slot": 3, "function": 0}, **device)]}]
    with pytest.raises(MonitorError):
        pciview.parse_query_pci(reply)


@pytest.mark.parametrize("header", [
    "Bus  ², device   3, function 0:", "Bus  ١٢, device   3, function 0:", "Bus  0, device ١٢, function 0:",
    "Bus  0, device   3, function ²:", f"Bus  {'9' * 5000}, device   3, function 0:", "Bus 256, device 3, function 0:",
    "Bus  0, device  32, function 0:", "Bus  0, device   3, function 8:",
], ids=short)
def test_info_pci_refuses_non_ascii_huge_and_out_of_range_numbers(header):
    with pytest.raises(MonitorError):
        pciview.parse_info_pci(f"  {header}\n    Class 0255: PCI device 1af4:1005\n      id \"rng1\"\n")


@pytest.mark.parametrize("line", ["secondary bus ١٢.", f"secondary bus {'9' * 5000}.", "secondary bus 256."],
                         ids=short)
def test_info_pci_refuses_bad_secondary_bus(line):
    with pytest.raises(MonitorError):
        pciview.parse_info_pci(
            f"  Bus  0, device   5, function 0:\n    PCI bridge: PCI device 1b36:0001\n      {line}\n"
        )


@pytest.mark.parametrize("count", ["9" * 5000, "9" * 4301, "²", "١٢", "0" * 5000], ids=short)
def test_request_count_beyond_ints_and_ascii_is_invalid(count):
    with pytest.raises(InvalidPciRequest):
        request.get_pci_requests_from_flavor({"extra_specs": {"pci_passthrough:alias": f"a1:{count}"}}, ALIASES)


def test_200000_nested_brackets_give_each_module_its_typed_error():
    text = "[" * 200_000
    with pytest.raises(InvalidAlias):
        request.parse_aliases(text)
    with pytest.raises(InvalidAlias):
        request.parse_aliases([text])
    with pytest.raises(InvalidAlias):
        request.parse_alias(text)
    with pytest.raises(InvalidPciRequest):
        request.requests_from_json(text)
    with pytest.raises(InvalidPciRequest):
        request.InstancePciRequest.from_json(text)
    with pytest.raises(InvalidPciRequest):
        request.get_instance_pci_requests({"system_metadata": {"pci_requests": text}})
    with pytest.raises(InvalidDeviceSpec):
        devspec.Whitelist.from_config(text)
    with pytest.raises(InvalidDeviceSpec):
        devspec.Whitelist.from_config([text])
    with tempfile.TemporaryDirectory() as state_dir, store.Store(state_dir) as db:
        with pytest.raises(InvalidDevicesJson):
            PciDevTracker(db).update_devices_from_hypervisor_resources(text)
    with pytest.raises(StateImportError):
        store.parse_export(text)


def test_deep_python_values_give_typed_errors():
    """Nesting JSON could not hold (parsed values handed over directly) is refused, never a RecursionError."""
    deep = nested(100_000)
    for call, error in (
        (lambda: request.parse_aliases([deep]), InvalidAlias),
        (lambda: request.parse_aliases([{"name": deep}]), InvalidAlias),
        (lambda: request.InstancePciRequest.from_dict({"count": 1, "spec": deep}), InvalidPciRequest),
        (lambda: request.InstancePciRequest.from_dict(
            {"count": 1, "spec": [{"vendor_id": "8086"}], "alias_name": deep}), InvalidPciRequest),
        (lambda: devspec.Whitelist.from_config([{"address": deep}]), InvalidDeviceSpec),
        (lambda: devspec.Whitelist.from_config([[deep]]), InvalidDeviceSpec),
        (lambda: device_from_hypervisor({"address": deep}), InvalidDevicesJson),
        (lambda: pciview.parse_query_pci([{"devices": [{"bus": 0, "slot": 1, "function": 0, "qdev_id": deep}]}]),
         MonitorError),
    ):
        with pytest.raises(error):
            call()


def test_huge_ints_in_python_values_give_typed_errors():
    for call, error in (
        (lambda: request.parse_aliases([{"name": BIG}]), InvalidAlias),
        (lambda: devspec.Whitelist.from_config([{"vendor_id": BIG}]), InvalidDeviceSpec),
        (lambda: device_from_hypervisor({"address": BIG}), InvalidDevicesJson),
        (lambda: pciview.parse_query_pci([{"devices": [{"bus": BIG, "slot": 1, "function": 0}]}]), MonitorError),
    ):
        with pytest.raises(error):
            call()


@pytest.mark.parametrize("regex", ["(" * 3000 + ")" * 3000, "a{4294967296}", "a{99999999999999999999}", "(?P<", "["],
                         ids=short)
def test_device_spec_regexes_that_python_cannot_compile_are_invalid(regex):
    with pytest.raises(InvalidDeviceSpec):
        devspec.Whitelist.from_config([{"address": {"bus": regex}}])


@pytest.mark.parametrize("text", ["0000:0a:00.²", "0000:١٢:00.0", "٠٠٠٠:0a:00.0", "0000:0a:00." + "9" * 5000],
                         ids=short)
def test_addresses_with_non_ascii_or_huge_digits_are_invalid(text):
    with pytest.raises(InvalidPciAddress):
        address.parse_address(text)
    with pytest.raises(InvalidDeviceSpec):
        devspec.Whitelist.from_config([{"address": text}])


@pytest.mark.parametrize("text", ["nic-9f3c2a1b-pci-²", "nic-9f3c2a1b-pci-١٢", "nic-9f3c2a1b-pci-" + "9" * 5000],
                         ids=short)
def test_device_ids_with_non_ascii_or_huge_digits_are_invalid(text):
    with pytest.raises(InvalidDeviceId):
        devid.parse_device_id(text)


# --- validators of devid / model / store: the same property on the values fuzzing hit -----------

def _export_with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(EXPORT)
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


_DEEP = nested(5000)
_VALID_SPEC = {"uuid": UUID, "dev_type": "nic", "driver": "virtio-net-pci", "props": {"netdev": "net0"},
               "bus": "pci.0", "slot": 4}
_VALIDATOR_CASES = [
    *[pytest.param(fn, (value,), {}, id=f"{fn.__name__}-{label}")
      for fn in (devid.validate_uuid, devid.validate_dev_type, devid.validate_vm_name, devid.validate_bus,
                 devid.validate_driver, devid.parse_device_id)
      for label, value in (("huge_int", BIG), ("deep", _DEEP))],
    *[pytest.param(devid.validate_props, ({"netdev": "net0"}, driver), {}, id=f"validate_props-driver-{label}")
      for label, driver in (("list", []), ("False", False), ("float", 1.5), ("dict", {}), ("huge_int", BIG))],
    pytest.param(devid.validate_props, ({BIG: 1},), {}, id="validate_props-huge-int-name"),
    *[pytest.param(model.DeviceSpec, (), dict(_VALID_SPEC, **{field: value}), id=f"DeviceSpec-{field}-{label}")
      for field in ("uuid", "dev_type", "driver", "bus", "slot")
      for label, value in (("huge_int", BIG), ("deep", _DEEP))],
    *[pytest.param(store.parse_export, (_export_with(path, value),), {},
                   id=f"parse_export-{'.'.join(map(str, path))}-{label}")
      for path in (("format",), ("version",), ("vm", "name"), ("vm", "machine"), ("devices", 0, "uuid"),
                   ("devices", 0, "type"), ("devices", 0, "driver"), ("devices", 0, "bus"), ("devices", 0, "slot"),
                   ("devices", 0, "state"), ("devices", 0, "id"))
      for label, value in (("huge_int", BIG), ("deep", _DEEP))],
]


@pytest.mark.parametrize("call,args,kwargs", _VALIDATOR_CASES)
def test_validators_raise_only_kvmslots_errors(call, args, kwargs):
    """Values that JSON cannot carry but a Python caller can: a 5000-digit int, 5000-deep lists."""
    survives(call, *args, **kwargs)
