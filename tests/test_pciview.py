"""Parsing QEMU's live PCI view (samples captured from QEMU 7.2: pc machine,
a pci-bridge 'br1' at slot 5 with virtio-rng 'rng1' behind it at slot 3, and
pci-testdev 'td0' at slot 6)."""

import json
from pathlib import Path

import pytest

from kvmslots import InvalidBus, MonitorError, parse_info_pci, parse_query_pci

DATA = Path(__file__).parent / "data"
EXPECTED = {0: {0, 1, 2, 5, 6}, 1: {3}}


@pytest.fixture
def query_reply():
    return json.loads((DATA / "query-pci.json").read_text())


@pytest.fixture
def info_text():
    return (DATA / "info-pci.txt").read_text()


def test_query_pci_occupancy_walks_bridges(query_reply):
    view = parse_query_pci(query_reply)
    assert view == EXPECTED
    assert parse_query_pci({"return": query_reply}) == EXPECTED


def test_info_pci_gives_the_same_occupancy(query_reply, info_text):
    assert parse_info_pci(info_text) == parse_query_pci(query_reply) == EXPECTED


@pytest.mark.parametrize("parse,fixture", [(parse_query_pci, "query_reply"), (parse_info_pci, "info_text")])
def test_qdev_ids_and_bus_names_are_kept(parse, fixture, request):
    view = parse(request.getfixturevalue(fixture))
    assert (view.find("rng1").bus, view.find("rng1").slot) == (1, 3)
    assert (view.find("td0").bus, view.find("td0").slot) == (0, 6)
    assert view.find("nosuch") is None and view.find("") is None
    assert view.bus_number("pci.0") == 0 and view.bus_number("br1") == 1
    with pytest.raises(InvalidBus):
        view.bus_number("br9")
    assert view.find("td0").vendor == 0x1B36


def test_the_seed_regex_slots_still_match(info_text):
    import re

    ganeti = re.compile(r"Bus.*device[ ]*(\d+).*")  # Ganeti 2.10's hv_kvm `info pci` regex
    ganeti_slots = {int(m.group(1)) for line in info_text.splitlines() if (m := ganeti.search(line))}
    view = parse_info_pci(info_text)
    assert ganeti_slots == view[0] | view[1]


def test_bridge_before_firmware_has_no_bus_number():
    reply = [{"bus": 0, "devices": [{"bus": 0, "slot": 5, "function": 0, "qdev_id": "br1", "id": {},
                                     "class_info": {}, "pci_bridge": {"bus": {"number": 0, "secondary": 0,
                                                                              "subordinate": 0}}}]}]
    with pytest.raises(MonitorError, match="firmware"):
        parse_query_pci(reply).bus_number("br1")


@pytest.mark.parametrize("bad", [None, "text", {"return": {}}, [{"devices": [{"slot": 1}]}], [{"devices": "x"}]])
def test_malformed_query_pci(bad):
    with pytest.raises(MonitorError):
        parse_query_pci(bad)


def test_info_pci_error_text():
    with pytest.raises(MonitorError, match="Error"):
        parse_info_pci("Error: something broke\n")
    assert parse_info_pci("") == {}
