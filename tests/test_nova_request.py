"""Nova 34.0.0's own unit tests, ported to kvmslots' API (issue 10).

Sources: ``nova/tests/unit/pci/test_request.py`` (aliases, flavor requests)
and ``nova/tests/unit/pci/test_utils.py`` (``PciDeviceMatchTestCase``: spec
matching).  Inputs and expected answers are Nova's, rewritten for kvmslots:
``get_alias_from_config`` is :func:`parse_aliases`, ``_translate_alias_to_requests``
and ``get_pci_requests_from_flavor`` are :func:`get_pci_requests_from_flavor`,
``pci_device_prop_match(dev, specs)`` is :func:`request_matches(specs, dev)`.
Where kvmslots deliberately differs from Nova, the test says so.

Not ported (no counterpart in kvmslots): the ``pci_in_placement`` cases
(placement-based PCI tracking is refused outright), the ``functools.cache`` of
the config (kvmslots parses what it is given, no global config), and
``get_instance_pci_request_from_vif`` (Neutron VIFs and ComputeNode objects).
"""

from __future__ import annotations

import json

import pytest

from kvmslots.errors import AliasNotDefined, InvalidAlias
from kvmslots.pci.request import (
    NUMA_POLICIES,
    AliasSpec,
    get_pci_requests_from_flavor,
    parse_alias,
    parse_aliases,
    request_matches,
)

FAKE_ALIAS1 = json.dumps({
    "name": "QuickAssist",
    "capability_type": "pci",
    "product_id": "4443",
    "vendor_id": "8086",
    "device_type": "type-PCI",
    "numa_policy": "legacy",
    "live_migratable": "true",
})
FAKE_ALIAS2 = json.dumps({
    "name": "IntelNIC",
    "capability_type": "pci",
    "product_id": "1111",
    "vendor_id": "8086",
    "device_type": "type-PF",
    "live_migratable": "false",
})

# Nova keeps "capability_type": "pci" in every request spec (its own TODO says the key is used only
# by tests).  kvmslots validates it and leaves it out: a device record has no capability_type, so a
# spec carrying it could match a device only because Nova's pools happen to ignore it.
QA_SPEC = {"vendor_id": "8086", "product_id": "4443", "dev_type": "type-PCI", "live_migratable": "true"}
NIC_SPEC = {"vendor_id": "8086", "product_id": "1111", "dev_type": "type-PF", "live_migratable": "false"}


def flavor(value):
    return {"extra_specs": {"pci_passthrough:alias": value}}


def summary(requests):
    return [(r.count, r.alias_name, r.spec) for r in requests]


# --- PciRequestTestCase: get_alias_from_config -------------------------------------------

def test_get_alias_from_config_valid():
    aliases = parse_aliases([FAKE_ALIAS1])
    (spec,) = aliases["QuickAssist"]
    assert spec.numa_policy == "legacy"
    assert spec.to_spec() == QA_SPEC  # Nova: the same plus "capability_type": "pci" (see above)


def test_get_alias_from_config_valid_multispec():
    other = json.dumps({"name": "QuickAssist", "capability_type": "pci", "product_id": "4444",
                        "vendor_id": "8086", "device_type": "type-PCI"})
    specs = parse_aliases([FAKE_ALIAS1, other])["QuickAssist"]
    assert [s.numa_policy for s in specs] == ["legacy", "legacy"]
    assert [s.to_spec() for s in specs] == [
        QA_SPEC,
        {"vendor_id": "8086", "product_id": "4444", "dev_type": "type-PCI"},
    ]


@pytest.mark.parametrize("alias, fragment", [
    ({"name": "xxx", "device_type": "N"}, "'device_type' must be"),                   # ..._invalid_device_type
    ({"name": "xxx", "live_migratable": "invalid"}, "'live_migratable'"),            # ..._invalid_live_migratable
    ({"name": "xxx", "device_type": "vdpa"}, "'device_type' must be"),                # ..._device_type_vdpa
    ({"name": "xxx", "product_id": "g111"}, "'product_id' must be 4 hex digits"),     # ..._invalid_product_id
    ({"name": "xxx", "vendor_id": "0xg111"}, "'vendor_id' must be 4 hex digits"),     # ..._invalid_vendor_id
    ({"name": "xxx", "capability_type": "usb"}, "'capability_type'"),                # ..._invalid_capability_type
    ({"name": "xxx", "numa_policy": "derp"}, "'numa_policy' must be"),                # ..._invalid_numa_policy
    ({"name": "xxx", "foo": "bar"}, "unknown key 'foo'"),                             # ..._invalid_arbitrary_field
], ids=["device_type", "live_migratable", "vdpa", "product_id", "vendor_id", "capability_type", "numa_policy",
        "arbitrary_field"])
def test_get_alias_from_config_invalid(alias, fragment):
    with pytest.raises(InvalidAlias, match=fragment):
        parse_aliases([json.dumps(alias)])
    with pytest.raises(InvalidAlias, match=fragment):
        parse_alias(alias)


def test_get_alias_from_config_valid_numa_policy():
    for policy in NUMA_POLICIES:  # Nova's PCINUMAAffinityPolicy.ALL
        aliases = parse_aliases([json.dumps({"name": "xxx", "capability_type": "pci", "product_id": "1111",
                                             "vendor_id": "8086", "device_type": "type-PCI",
                                             "numa_policy": policy})])
        assert "xxx" in aliases
        assert aliases["xxx"][0].numa_policy == policy


def test_get_alias_from_config_conflicting_device_type():
    a = {"name": "xxx", "capability_type": "pci", "product_id": "1111", "vendor_id": "8086", "device_type": "type-PF"}
    b = dict(a, device_type="type-PCI")
    with pytest.raises(InvalidAlias, match="^Device type mismatch for alias 'xxx'$"):
        parse_aliases([json.dumps(a), json.dumps(b)])


def test_get_alias_from_config_conflicting_numa_policy():
    a = {"name": "xxx", "capability_type": "pci", "product_id": "1111", "vendor_id": "8086", "numa_policy": "required"}
    b = dict(a, numa_policy="legacy")
    with pytest.raises(InvalidAlias, match="^NUMA policy mismatch for alias 'xxx'$"):
        parse_aliases([json.dumps(a), json.dumps(b)])


def test_get_alias_from_config_missing_ids():
    aliases = [
        {"name": "a1", "product_id": "4444"},
        {"name": "a2", "vendor_id": "4444"},
        {"name": "a3"},
        {"name": "a5", "vendor_id": "4444", "product_id": "4444"},
    ]
    with pytest.raises(InvalidAlias) as info:
        parse_aliases([json.dumps(a) for a in aliases])
    assert str(info.value) == "The PCI alias(es) a1,a2,a3 does not have vendor_id and product_id fields set."
    # Nova's a4 ({"name": "a4", "resource_class": "foo"}) is in that list too: without PCI in placement Nova
    # ignores resource_class.  kvmslots has no placement and refuses the key instead of ignoring it.
    with pytest.raises(InvalidAlias, match="placement-based PCI tracking is not supported"):
        parse_aliases([json.dumps({"name": "a4", "resource_class": "foo"})])


def test_get_alias_from_config_valid_rc_and_traits_is_refused_without_placement():
    # Nova accepts {"resource_class", "traits"} only with [filter_scheduler]pci_in_placement; kvmslots has
    # no placement and says so (deliberate difference, not a port of the placement case itself).
    with pytest.raises(InvalidAlias, match="placement"):
        parse_aliases([json.dumps({"name": "xxx", "resource_class": "foo", "traits": "bar,baz"})])


# --- PciRequestTestCase: _translate_alias_to_requests / get_pci_requests_from_flavor --------

@pytest.fixture
def aliases12():
    return parse_aliases([FAKE_ALIAS1, FAKE_ALIAS2])


def test_translate_alias_to_requests(aliases12):
    requests = get_pci_requests_from_flavor(flavor("QuickAssist : 3, IntelNIC: 1"), aliases12)
    assert {r.count for r in requests} == {1, 3}
    assert summary(requests) == [(3, "QuickAssist", [QA_SPEC]), (1, "IntelNIC", [NIC_SPEC])]
    assert all(r.request_id is not None for r in requests)


def test_translate_alias_to_requests_invalid(aliases12):
    with pytest.raises(AliasNotDefined, match="QuickAssistX"):
        get_pci_requests_from_flavor(flavor("QuickAssistX : 3"), aliases12)


def test_translate_alias_to_requests_affinity_policy(aliases12):
    requests = get_pci_requests_from_flavor(flavor("QuickAssist : 3, IntelNIC: 1"), aliases12,
                                            affinity_policy="preferred")
    assert summary(requests) == [(3, "QuickAssist", [QA_SPEC]), (1, "IntelNIC", [NIC_SPEC])]
    assert [r.numa_policy for r in requests] == ["preferred", "preferred"]


def test_get_pci_requests_from_flavor():
    requests = get_pci_requests_from_flavor(flavor("QuickAssist:3"), parse_aliases([FAKE_ALIAS1]))
    assert len(requests) == 1
    assert summary(requests) == [(3, "QuickAssist", [QA_SPEC])]


def test_get_pci_requests_from_flavor_multiple(aliases12):
    requests = get_pci_requests_from_flavor(flavor("QuickAssist:3, IntelNIC: 1"), aliases12)
    assert len(requests) == 2
    assert summary(requests) == [(3, "QuickAssist", [QA_SPEC]), (1, "IntelNIC", [NIC_SPEC])]


def test_get_pci_requests_from_flavor_including_space():
    alias4 = json.dumps({"name": " Cirrus Logic ", "capability_type": "pci", "product_id": "0ff2",
                         "vendor_id": "10de", "device_type": "type-PCI"})
    aliases = parse_aliases([FAKE_ALIAS2, alias4])
    requests = get_pci_requests_from_flavor(flavor(" Cirrus Logic : 4, IntelNIC: 3"), aliases)
    assert len(requests) == 2
    assert summary(requests) == [
        (4, "Cirrus Logic", [{"vendor_id": "10de", "product_id": "0ff2", "dev_type": "type-PCI"}]),
        (3, "IntelNIC", [NIC_SPEC]),
    ]


def test_get_pci_requests_from_flavor_no_extra_spec(aliases12):
    assert get_pci_requests_from_flavor({}, aliases12) == []


def test_get_pci_requests_from_flavor_affinity_policy(aliases12):
    # Nova mocks _translate_alias_to_requests and checks the policy is passed on; here the policy is
    # checked on the requests themselves.
    requests = get_pci_requests_from_flavor(flavor("QuickAssist:3, IntelNIC: 1"), aliases12,
                                            affinity_policy="preferred")
    assert {r.numa_policy for r in requests} == {"preferred"}


# --- issue 10, item 7: what Nova 34's alias handling implies ---------------------------------

def test_an_alias_named_twice_in_the_extra_spec_gives_two_requests(aliases12):
    requests = get_pci_requests_from_flavor(flavor("QuickAssist:1, QuickAssist:2"), aliases12)
    assert summary(requests) == [(1, "QuickAssist", [QA_SPEC]), (2, "QuickAssist", [QA_SPEC])]
    assert requests[0].request_id != requests[1].request_id


@pytest.mark.parametrize("key", ["live_migratable", "managed", "remote_managed"])
@pytest.mark.parametrize("word, normal", [("yes", "true"), ("On", "true"), ("1", "true"), (True, "true"),
                                          ("no", "false"), ("F", "false"), ("0", "false"), (False, "false")])
def test_boolean_alias_tags_are_normalised_like_device_spec_tags(key, word, normal):
    (spec,) = parse_aliases([{"name": "a", "vendor_id": "8086", "product_id": "0443", key: word}])["a"]
    assert spec.to_spec()[key] == normal


@pytest.mark.parametrize("key", ["live_migratable", "managed", "remote_managed"])
def test_boolean_alias_tags_refuse_other_words(key):
    with pytest.raises(InvalidAlias, match=f"'{key}' must be true or false"):
        parse_aliases([{"name": "a", "vendor_id": "8086", "product_id": "0443", key: "maybe"}])


def test_well_known_tags_are_kept_and_others_need_extra_tags():
    # kvmslots keeps the alias tags of the OpenStack wiki's SR-IOV design ("PCI passthrough SRIOV
    # support") that Nova 34's schema no longer has; any other key is refused (a typo), unless the
    # caller names it as one of its device_spec tags.
    (spec,) = parse_aliases([{"name": "a", "vendor_id": "8086", "product_id": "154c",
                              "physical_network": "physnet1", "trusted": "true"}])["a"]
    assert dict(spec.extra) == {"physical_network": "physnet1", "trusted": "true"}
    custom = {"name": "a", "vendor_id": "8086", "product_id": "154c", "rack": "r1"}
    with pytest.raises(InvalidAlias, match="unknown key 'rack'"):
        parse_aliases([custom])
    assert dict(parse_aliases([custom], extra_tags=["rack"])["a"][0].extra) == {"rack": "r1"}
    assert parse_alias(custom, extra_tags={"rack"}).extra == {"rack": "r1"}
    with pytest.raises(InvalidAlias, match="extra_tags"):
        parse_aliases([custom], extra_tags="rack")
    with pytest.raises(InvalidAlias, match="extra_tags"):
        parse_aliases([custom], extra_tags=["Bad Tag"])


def test_alias_spec_equality_unchanged():
    assert parse_alias({"name": "a", "vendor_id": "8086", "product_id": "0443"}) == AliasSpec("a", "8086", "0443")


# --- test_utils.PciDeviceMatchTestCase: pci_device_prop_match ----------------------------------
# Nova's fake device {'vendor_id': 'v1', 'device_id': 'd1', 'capabilities_network': [...]}: kvmslots
# compares vendor_id/product_id/dev_type with the device's fields and every other key with its tags.

FAKE_PCI_1 = {"vendor_id": "v1", "tags": {"device_id": "d1", "capabilities_network": ["cap1", "cap2", "cap3"]}}


def test_single_spec_match():
    assert request_matches([{"vendor_id": "v1", "device_id": "d1"}], FAKE_PCI_1)
    assert request_matches([{"vendor_id": "V1", "device_id": "D1"}], FAKE_PCI_1)


def test_multiple_spec_match():
    assert request_matches([{"vendor_id": "v1", "device_id": "d1"}, {"vendor_id": "v3", "device_id": "d3"}],
                           FAKE_PCI_1)


def test_spec_mismatch():
    assert not request_matches([{"vendor_id": "v4", "device_id": "d4"}, {"vendor_id": "v3", "device_id": "d3"}],
                               FAKE_PCI_1)


def test_spec_extra_key():
    assert not request_matches([{"vendor_id": "v1", "device_id": "d1", "wrong_key": "k1"}], FAKE_PCI_1)


def test_spec_list():
    assert request_matches([{"vendor_id": "v1", "device_id": "d1",
                             "capabilities_network": ["cap1", "cap2", "cap3"]}], FAKE_PCI_1)
    assert request_matches([{"vendor_id": "v1", "device_id": "d1",
                             "capabilities_network": ["cap3", "cap1"]}], FAKE_PCI_1)


def test_spec_list_no_matching():
    assert not request_matches([{"vendor_id": "v1", "device_id": "d1",
                                 "capabilities_network": ["cap1", "cap33"]}], FAKE_PCI_1)


def test_spec_list_wrong_type():
    # issue 10, item 8: this raised AttributeError (list.lower) in kvmslots
    assert not request_matches([{"vendor_id": "v1", "device_id": ["d1"]}], FAKE_PCI_1)


def test_list_values_on_device_objects_and_fields():
    class Dev:
        vendor_id, product_id, dev_type = "8086", "0443", "type-PCI"
        tags = {"caps": ["rx", "tx"]}

    assert request_matches([{"caps": ["tx"]}], Dev())
    assert not request_matches([{"caps": ["tso"]}], Dev())
    assert not request_matches([{"vendor_id": ["8086"]}], Dev())  # a list never equals a string field
