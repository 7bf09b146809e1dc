"""Nova's device_spec (whitelist): every accepted format, first match wins, typed errors."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmslots.errors import InvalidDevicesJson, InvalidDeviceSpec, ValidationError
from kvmslots.pci.address import PciAddress
from kvmslots.pci.devspec import (
    DeviceSpecEntry,
    ExactAddresses,
    GlobAddress,
    Whitelist,
    parse_glob,
)


def dev(address, vendor="8086", product="1520", dev_type="type-PCI", parent=None, **extra):
    d = {"address": address, "vendor_id": vendor, "product_id": product, "dev_type": dev_type}
    if parent is not None:
        d["parent_addr"] = parent
        d["dev_type"] = "type-VF"
    d.update(extra)
    return d


def wl(*entries):
    return Whitelist.from_config([json.dumps(e) if not isinstance(e, str) else e for e in entries])


# --- the reference's examples, as written -----------------------------------------

def test_reference_glob_example():
    w = wl('{"address":"*:0a:00.*","physical_network":"physnet1"}')
    assert w.match(dev("0000:0a:00.3")) == {"physical_network": "physnet1"}
    assert w.match(dev("0001:0a:00.0")) == {"physical_network": "physnet1"}
    assert w.match(dev("0000:0b:00.0")) is None
    assert w.match(dev("0000:0a:01.0")) is None


def test_reference_regex_example():
    w = wl('{"address":{"domain":".*","bus":"02","slot":"0[1-2]","function":"[2-7]"}}')
    for ok in ("0000:02:01.2", "0000:02:02.7", "0010:02:01.5"):
        assert w.match(dev(ok)) == {}, ok
    for bad in ("0000:02:03.2", "0000:02:01.1", "0000:12:01.2", "0000:02:11.2"):
        assert w.match(dev(bad)) is None, bad


def test_reference_vendor_product_example():
    w = wl('{"vendor_id":"1137","product_id":"0071"}')
    assert w.device_assignable(dev("0000:05:00.0", "1137", "0071"))
    assert not w.device_assignable(dev("0000:05:00.0", "1137", "0072"))
    assert not w.device_assignable(dev("0000:05:00.0", "8086", "0071"))


def test_reference_devname_example():
    w = wl('{"devname":"eth0","physical_network":"physnet1"}')
    assert w.match(dev("0000:05:00.0", devname="eth0")) == {"physical_network": "physnet1"}
    assert w.match(dev("0000:05:00.1", devname="eth1")) is None
    assert w.match(dev("0000:05:00.2")) is None
    # a VF of the PF named eth0
    assert w.match(dev("0000:05:10.0", parent="0000:05:00.0", parent_devname="eth0")) == {
        "physical_network": "physnet1"
    }


def test_reference_pf_address_matches_its_vfs():
    w = wl({"address": "0000:04:00.3", "physical_network": "physnet2"})
    assert w.match(dev("0000:04:00.3", dev_type="type-PF")) == {"physical_network": "physnet2"}
    assert w.match(dev("0000:04:10.7", product="1520", parent="0000:04:00.3")) == {"physical_network": "physnet2"}
    assert w.match(dev("0000:04:10.6", parent="0000:04:00.2")) is None


# --- nova.conf's documented examples ----------------------------------------------

NOVA_CONF_EXAMPLES = [
    '{"devname":"eth0", "physical_network":"physnet"}',
    '{"address":"*:0a:00.*"}',
    '{"address":":0a:00.", "physical_network":"physnet1"}',
    '{"vendor_id":"1137", "product_id":"0071"}',
    '{"vendor_id":"1137", "product_id":"0071", "address": "0000:0a:00.1", "physical_network":"physnet1"}',
    '{"address":{"domain": ".*", "bus": "02", "slot": "01", "function": "[2-7]"}, "physical_network":"physnet1"}',
    '{"address":{"domain": ".*", "bus": "02", "slot": "0[1-2]", "function": ".*"}, "physical_network":"physnet1"}',
    '{"devname": "eth0", "physical_network":"physnet1", "trusted": "true"}',
    '{"vendor_id":"a2d6", "product_id":"15b3", "remote_managed": "true"}',
    ('{"vendor_id":"a2d6", "product_id":"15b3", "address": "0000:82:00.0", "physical_network":"physnet1",'
     ' "remote_managed": "true"}'),
    ('{"vendor_id":"1002", "product_id":"6929", "address": "0000:82:00.0", "resource_class": "PGPU",'
     ' "traits": "HW_GPU_API_VULKAN,my-awesome-gpu"}'),
    '[{"product_id":"0001", "vendor_id":"8086"}, {"product_id":"0002", "vendor_id":"8086"}]',
]


@pytest.mark.parametrize("text", NOVA_CONF_EXAMPLES)
def test_nova_conf_examples_parse(text):
    assert len(Whitelist.from_config([text])) >= 1


def test_colon_glob_means_any_domain_and_function():
    w = wl({"address": ":0a:00.", "physical_network": "physnet1"})
    assert w.match(dev("0003:0a:00.6")) == {"physical_network": "physnet1"}
    assert w.match(dev("0003:0a:01.6")) is None


@pytest.mark.parametrize(
    "glob, parts",
    [
        ("*:0a:00.*", (None, 0x0A, 0, None)),
        ("0a:00.1", (None, 0x0A, 0, 1)),
        (":0a:", (None, 0x0A, None, None)),
        ("00.1", (None, None, 0, 1)),
        (".3", (None, None, None, 3)),
        ("", (None, None, None, None)),
        ("*", (None, None, None, None)),
        ("1F", (None, None, 0x1F, None)),
        ("ffff:ff:1f.*", (0xFFFF, 0xFF, 0x1F, None)),
        (" 0a : 00 . 1 ", (None, 0x0A, 0, 1)),
    ],
)
def test_glob_forms(glob, parts):
    assert parse_glob(glob) == GlobAddress(*parts)


def test_full_glob_is_an_exact_address():
    assert parse_glob("0:A:1.2") == ExactAddresses(frozenset({"0000:0a:01.2"}))


def test_tags_from_json_true_and_null():
    w = wl('{"vendor_id": "8086", "trusted": true, "physical_network": null}')
    assert w.match(dev("0000:01:00.0")) == {"trusted": "true"}


def test_ids_are_normalised():
    w = wl({"vendor_id": "80EE", "product_id": " 71 "})
    assert w.specs[0].vendor_id == "80ee" and w.specs[0].product_id == "0071"
    assert w.device_assignable(dev("0000:01:00.0", "80ee", "0071"))


def test_one_json_string_holding_a_list_and_dict_items():
    text = json.dumps([{"vendor_id": "8086", "product_id": "1520", "tag": "a"}, {"vendor_id": "8086", "tag": "b"}])
    w = Whitelist.from_config(text)
    assert len(w) == 2
    assert w.match(dev("0000:01:00.0")) == {"tag": "a"}
    w2 = Whitelist.from_config([{"vendor_id": "8086"}, [{"vendor_id": "1137"}]])
    assert len(w2) == 2


def test_empty_whitelist_matches_nothing():
    for config in (None, [], "[]"):
        w = Whitelist.from_config(config)
        assert w.match(dev("0000:01:00.0")) is None


# --- first match wins ----------------------------------------------------------------

def test_first_match_wins_with_tags():
    w = wl(
        {"vendor_id": "8086", "physical_network": "first"},
        {"address": "0000:01:00.0", "physical_network": "second"},
    )
    assert w.match(dev("0000:01:00.0")) == {"physical_network": "first"}


def test_indexed_entry_before_scan_entry_wins():
    w = wl(
        {"address": ["0000:01:00.0", "0000:01:00.1"], "physical_network": "listed"},
        {"address": "*:01:*.*", "physical_network": "glob"},
        {"address": "0000:01:00.2", "physical_network": "exact"},
    )
    assert w.match(dev("0000:01:00.1")) == {"physical_network": "listed"}
    assert w.match(dev("0000:01:00.2")) == {"physical_network": "glob"}
    assert w.match(dev("0000:01:00.3")) == {"physical_network": "glob"}


def test_exact_entry_that_fails_on_vendor_falls_through():
    w = wl(
        {"address": "0000:01:00.0", "vendor_id": "1137", "physical_network": "cisco"},
        {"address": "0000:01:00.0", "physical_network": "any"},
    )
    assert w.match(dev("0000:01:00.0")) == {"physical_network": "any"}


def test_vf_own_address_entry_vs_parent_entry_order():
    w = wl(
        {"address": "0000:04:00.0", "physical_network": "pf"},
        {"address": "0000:04:10.1", "physical_network": "vf"},
    )
    assert w.match(dev("0000:04:10.1", parent="0000:04:00.0")) == {"physical_network": "pf"}
    w = wl(
        {"address": "0000:04:10.1", "physical_network": "vf"},
        {"address": "0000:04:00.0", "physical_network": "pf"},
    )
    assert w.match(dev("0000:04:10.1", parent="0000:04:00.0")) == {"physical_network": "vf"}


def test_match_returns_a_copy():
    w = wl({"physical_network": "p"})
    w.match(dev("0000:01:00.0"))["physical_network"] = "changed"
    assert w.match(dev("0000:01:00.0")) == {"physical_network": "p"}


# --- address kinds --------------------------------------------------------------------

def test_address_list_matches_listed_and_their_vfs():
    w = wl({"address": ["0000:81:00.1", "0000:81:00.2"], "physical_network": "physnet1"})
    assert w.match(dev("0000:81:00.1")) == {"physical_network": "physnet1"}
    assert w.match(dev("0000:81:00.2")) == {"physical_network": "physnet1"}
    assert w.match(dev("0000:81:00.3")) is None
    assert w.match(dev("0000:81:10.0", parent="0000:81:00.2")) == {"physical_network": "physnet1"}


def test_glob_with_wildcard_does_not_match_by_parent():
    w = wl({"address": "*:04:00.0"})
    assert w.match(dev("0000:05:10.0", parent="0000:04:00.0")) is None


def test_all_hex_regex_dict_is_a_full_address_and_covers_vfs():
    w = wl({"address": {"domain": "0000", "bus": "04", "slot": "00", "function": "0"}})
    assert w.specs[0].exact_addresses == frozenset({"0000:04:00.0"})
    assert w.device_assignable(dev("0000:04:00.0"))
    assert w.device_assignable(dev("0000:04:10.0", parent="0000:04:00.0"))


def test_regex_is_a_prefix_match_as_in_nova():
    # Nova matches each part with re.match: the pattern only has to match the start
    w = wl({"address": {"bus": "0", "slot": "0[0-1]"}})
    assert w.match(dev("0000:00:00.0")) == {}
    assert w.match(dev("0000:0f:01.0")) == {}
    assert w.match(dev("0000:10:00.0")) is None
    w = wl({"address": {"bus": "0.", "function": "[2-7]"}})
    assert w.device_assignable(dev("0000:0a:00.2"))
    assert not w.device_assignable(dev("0000:1a:00.2"))
    w = wl({"address": {"slot": "0"}})
    assert all(w.device_assignable(dev(f"0000:00:{s:02x}.0")) for s in range(0x10))
    assert not any(w.device_assignable(dev(f"0000:00:{s:02x}.0")) for s in range(0x10, 0x20))
    w = wl({"address": {"slot": "0$"}})  # anchored: a full match
    assert not w.device_assignable(dev("0000:00:00.0"))


def test_regex_is_case_sensitive_as_in_nova():
    # the device's parts are lowercase hex; "0A" matches no bus (Nova's re.compile without IGNORECASE)
    assert not wl({"address": {"bus": "0A"}}).device_assignable(dev("0000:0a:00.0"))
    assert wl({"address": {"bus": "0a"}}).device_assignable(dev("0000:0a:00.0"))
    # an uppercase or short spelling of a full address stays a regex (Nova's sysfs lookup would not find it)
    upper = wl({"address": {"domain": "0000", "bus": "0A", "slot": "00", "function": "0"}})
    assert upper.specs[0].exact_addresses == frozenset()
    assert not upper.device_assignable(dev("0000:0a:00.0"))
    short = wl({"address": {"domain": "0", "bus": "0a", "slot": "0", "function": "0"}})
    assert short.specs[0].exact_addresses == frozenset()
    assert short.device_assignable(dev("0000:0a:05.0")) and short.device_assignable(dev("0abc:0a:00.0"))
    assert not short.device_assignable(dev("0000:0a:10.0"))
    assert not short.device_assignable(dev("0000:0b:10.0", parent="0000:0a:00.0"))


def test_devname_and_vendor_filter():
    w = wl({"devname": "ens1f0", "vendor_id": "15b3"})
    assert w.device_assignable(dev("0000:05:00.0", vendor="15b3", devname="ens1f0"))
    assert not w.device_assignable(dev("0000:05:00.0", vendor="8086", devname="ens1f0"))


def test_remote_managed_requires_card_serial_number():
    w = wl({"vendor_id": "15b3", "remote_managed": "true"})
    plain = dev("0000:05:00.1", vendor="15b3")
    assert not w.device_assignable(plain)
    with_sn = dict(plain, capabilities={"vpd": {"card_serial_number": "MT2113X00000"}})
    assert w.match(with_sn) == {"remote_managed": "true"}
    off = wl({"vendor_id": "15b3", "remote_managed": "false"})
    assert off.device_assignable(plain)


def test_entry_match_directly():
    entry = DeviceSpecEntry.from_dict({"address": "0000:01:00.0"})
    assert entry.match(dev("0000:01:00.0"))
    assert entry.match(dev("0000:01:10.0", parent="0000:01:00.0"))
    assert not entry.match(dev("0000:01:00.1"))


# --- errors ---------------------------------------------------------------------------------

BAD_ENTRIES = [
    ({"address": "0000:0g:00.0"}, "bus '0g'"),
    ({"address": "0000:0a:20.0"}, "slot '20'"),
    ({"address": "0000:0a:00.8"}, "function '8'"),
    ({"address": "10000:0a:00.0"}, "domain '10000'"),
    ({"address": "0000:100:00.0"}, "bus '100'"),
    ({"address": "1:2:3:4.0"}, "three"),
    ({"address": "0000:0a:00.1.2"}, "function '1.2'"),
    ({"address": "0*:0a:00.0"}, "domain '0*'"),
    ({"address": "0x1:0a:00.0"}, "domain '0x1'"),
    ({"address": {"bus": "[0-"}}, "bus '[0-' is not a valid regex"),
    ({"address": {"function": "(*)"}}, "function"),
    ({"address": {"bus": 2}}, "bus must be a regex string"),
    ({"address": {"bus": ""}}, "bus regex is empty"),
    ({"address": {"busy": "02"}}, "unknown address key(s) 'busy'"),
    ({"address": {"domain": "0000", "bus": "02", "slot": "20", "function": "0"}}, "slot '20'"),
    ({"address": []}, "address list is empty"),
    ({"address": ["0000:81:00.1", "0000:81:00"]}, "address list item 1"),
    ({"address": ["0000:81:00.1", 5]}, "address list item 1"),
    ({"address": 5}, "address must be a glob string, a dict of regexes or a list of addresses, got int"),
    ({"address": None}, "got NoneType"),
    ({"address": True}, "got bool"),
    ({"devname": "eth0", "address": "*:0a:00.*"}, "'address' and 'devname' are mutually exclusive"),
    ({"devname": ""}, "devname"),
    ({"devname": "a" * 16}, "devname"),
    ({"devname": "eth 0"}, "devname"),
    ({"devname": 3}, "devname"),
    ({"vendor_id": "80861"}, "vendor_id '80861'"),
    ({"vendor_id": "xyz"}, "vendor_id 'xyz'"),
    ({"vendor_id": ""}, "vendor_id ''"),
    ({"product_id": 8086}, "product_id must be a string"),
    ({"product_id": "0x10"}, "product_id '0x10'"),
    ({"physical_network": 1}, "tag 'physical_network' must be a string, got int"),
    ({"physical_network": ["a"]}, "tag 'physical_network' must be a string, got list"),
    ({"physical_network": {"a": "b"}}, "tag 'physical_network'"),
    ({"trusted": 1.5}, "tag 'trusted'"),
    ({"Physical_Network": "p"}, "tag name 'Physical_Network'"),
    ({"": "p"}, "tag name ''"),
    ({"dev_type": "type-VF"}, "'dev_type'"),
    ({"remote_managed": "maybe"}, "tag 'remote_managed' must be 'true' or 'false'"),
    ({"managed": "invalid"}, "tag 'managed' must be 'true' or 'false', got 'invalid'"),
    ({"live_migratable": "sure"}, "tag 'live_migratable' must be 'true' or 'false'"),
    ({"managed": 2}, "tag 'managed'"),
    ({"one_time_use": "TrUe"}, "one_time_use=true requires [pci] report_in_placement"),
]


@pytest.mark.parametrize("entry, fragment", BAD_ENTRIES, ids=[str(e) for e, _ in BAD_ENTRIES])
def test_bad_entries(entry, fragment):
    with pytest.raises(InvalidDeviceSpec) as info:
        Whitelist.from_config([{"vendor_id": "8086"}, json.dumps(entry)])
    assert fragment in str(info.value)
    assert "device_spec entry 1" in str(info.value)
    assert isinstance(info.value, ValidationError)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (["{not json"], "device_spec entry 0 is not valid JSON"),
        ('{"a": ', "device_spec is not valid JSON"),
        (["5"], "device_spec entry 0: expected a JSON object"),
        (['"text"'], "device_spec entry 0: expected a JSON object"),
        (['[{"vendor_id": "8086"}, 5]'], "device_spec entry 0[1]: expected a JSON object"),
        ([5], "device_spec entry 0: expected a JSON object"),
        (5, "device_spec must be a list"),
    ],
)
def test_bad_config_shapes(config, fragment):
    with pytest.raises(InvalidDeviceSpec) as info:
        Whitelist.from_config(config)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "device",
    [{"vendor_id": "8086"}, {"address": "0000:01:00"}, {"address": 5}, {"address": "0000:01:00.0", "parent_addr": "x"},
     "0000:01:00.0"],
)
def test_bad_devices(device):
    with pytest.raises(InvalidDevicesJson):
        wl({"vendor_id": "8086"}).match(device)


# --- properties ----------------------------------------------------------------------------

addresses = st.builds(
    PciAddress, st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7)
)
_SPELL = ("{:04x}", "{:02x}", "{:02x}", "{:x}")
_LIMITS = (0xFFFF, 0xFF, 0x1F, 7)


def _glob(parts):
    d, b, s, f = parts
    return f"{d}:{b}:{s}.{f}"


@given(addr=addresses, wild=st.lists(st.booleans(), min_size=4, max_size=4), upper=st.booleans())
def test_glob_from_an_address_matches_it(addr, wild, upper):
    values = (addr.domain, addr.bus, addr.slot, addr.function)
    parts = ["*" if w else fmt.format(v) for w, fmt, v in zip(wild, _SPELL, values)]
    text = _glob(parts).upper() if upper else _glob(parts)
    assert Whitelist.from_config([{"address": text}]).device_assignable(dev(str(addr)))


@given(addr=addresses, wild=st.lists(st.booleans(), min_size=4, max_size=4), which=st.integers(0, 3), data=st.data())
def test_glob_with_a_different_part_never_matches(addr, wild, which, data):
    values = [addr.domain, addr.bus, addr.slot, addr.function]
    other = data.draw(st.integers(0, _LIMITS[which]).filter(lambda v: v != values[which]))
    parts = ["*" if w else fmt.format(v) for w, fmt, v in zip(wild, _SPELL, values)]
    parts[which] = _SPELL[which].format(other)
    w = Whitelist.from_config([{"address": _glob(parts)}])
    assert not w.device_assignable(dev(str(addr)))


ENTRY_POOL = [
    {"address": "0000:04:00.0", "t": "pf0"},
    {"address": "0000:04:00.1", "vendor_id": "1137", "t": "pf1-cisco"},
    {"address": ["0000:04:10.0", "0000:04:10.2", "0000:05:00.0"], "t": "list"},
    {"address": "*:04:10.*", "t": "glob"},
    {"address": {"slot": "1[0-1]", "function": "[1357]"}, "t": "regex"},
    {"address": {"domain": "0000", "bus": "04", "slot": "00", "function": "1"}, "t": "hexdict"},
    {"vendor_id": "8086", "product_id": "1520", "t": "vp"},
    {"devname": "eth4", "t": "dev"},
    {"t": "all"},
]


@st.composite
def devices(draw):
    addr = draw(st.sampled_from(["0000:04:00.0", "0000:04:00.1", "0000:05:00.0"]))
    if draw(st.booleans()):
        parent = addr
        addr = f"0000:04:{draw(st.sampled_from([0x10, 0x11])):02x}.{draw(st.integers(0, 7))}"
    else:
        parent = None
    vendor = draw(st.sampled_from(["8086", "1137"]))
    product = draw(st.sampled_from(["1520", "1521"]))
    extra = {}
    if draw(st.booleans()):
        extra["devname" if parent is None else "parent_devname"] = draw(st.sampled_from(["eth4", "eth5"]))
    return dev(addr, vendor, product, parent=parent, **extra)


@settings(max_examples=300)
@given(picks=st.lists(st.sampled_from(ENTRY_POOL), max_size=7), device=devices())
def test_indexed_matching_equals_a_linear_scan(picks, device):
    w = Whitelist.from_config(picks)
    expected = next((spec for spec in w.specs if spec.match(device)), None)
    assert w.get_devspec(device) is expected


def test_many_vfs_and_entries_stay_fast():
    entries = [{"address": [f"0000:{b:02x}:00.{f}" for f in range(2)], "physical_network": f"net{b}"}
               for b in range(1, 200)]
    entries.append({"address": "*:f0:*.*", "physical_network": "glob"})
    w = Whitelist.from_config(entries)
    vfs = [dev(f"0000:{b:02x}:{s:02x}.{f}", parent=f"0000:{b:02x}:00.0")
           for b in range(1, 33) for s in range(0x10, 0x12) for f in range(8)] * 8  # 4096 VFs
    start = time.perf_counter()
    tags = [w.match(v) for v in vfs]
    assert time.perf_counter() - start < 2.0
    assert tags[0] == {"physical_network": "net1"}
    assert all(t is not None for t in tags)
    assert len(vfs) == 4096


def test_spec_entry_from_bad_type():
    with pytest.raises(InvalidDeviceSpec, match="expected a JSON object"):
        DeviceSpecEntry.from_dict(["x"])
