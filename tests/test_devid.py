"""Device ids <type>-<uuid8>-pci-<slot>: build, parse, reject."""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmslots import InvalidDeviceId, InvalidSlot, InvalidUUID, device_id, parse_device_id
from kvmslots.errors import InvalidDeviceType

U = "9F3C2A1B-5D6E-4F70-8192-A3B4C5D6E7F8"


def test_example_from_the_spec():
    assert device_id("nic", U, 5) == "nic-9f3c2a1b-pci-5"
    assert parse_device_id("nic-9f3c2a1b-pci-5") == ("nic", "9f3c2a1b", 5)


@given(dev_type=st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True), u=st.uuids(version=4), slot=st.integers(0, 31))
def test_round_trip(dev_type, u, slot):
    text = device_id(dev_type, str(u), slot)
    assert parse_device_id(text) == (dev_type, str(u)[:8], slot)


@pytest.mark.parametrize("bad_type", ["", "Nic", "1nic", "nic-x", "nic_x", "n" * 17, None, "nïc"])
def test_bad_types(bad_type):
    with pytest.raises(InvalidDeviceType):
        device_id(bad_type, U, 5)


@pytest.mark.parametrize("bad_uuid", ["", "9f3c2a1b", "9f3c2a1b-5d6e-4f70-8192-a3b4c5d6e7f", "not-a-uuid", None,
                                      "{9f3c2a1b-5d6e-4f70-8192-a3b4c5d6e7f8}", uuid.UUID(U)])
def test_bad_uuids(bad_uuid):
    with pytest.raises(InvalidUUID):
        device_id("nic", bad_uuid, 5)


@pytest.mark.parametrize("bad_slot", [-1, 32, "5", None, True])
def test_bad_slots(bad_slot):
    with pytest.raises(InvalidSlot):
        device_id("nic", U, bad_slot)


@pytest.mark.parametrize("text", ["nic-9f3c2a1b-pci-32", "nic-9f3c2a1b-pci-05", "nic-9F3C2A1B-pci-5",
                                  "nic-9f3c2a1-pci-5", "-9f3c2a1b-pci-5", "nic-9f3c2a1b-pci-", "nic-9f3c2a1b-pcie-5",
                                  "nic-9f3c2a1b-pci-5\n", "", 5, None])
def test_malformed_ids(text):
    with pytest.raises(InvalidDeviceId):
        parse_device_id(text)
