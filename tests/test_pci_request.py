"""Nova's PCI aliases and flavor requests: formats as written, typed errors, metadata round trips."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmslots.errors import (
    AliasNotDefined,
    InvalidAlias,
    InvalidPciRequest,
    ValidationError,
)
from kvmslots.pci.request import (
    AliasSpec,
    InstancePciRequest,
    delete_flavor_pci_info,
    get_instance_pci_requests,
    get_pci_requests_from_flavor,
    parse_alias,
    parse_aliases,
    request_matches,
    requests_from_json,
    requests_to_json,
    save_flavor_pci_info,
)

QAT = '{"name":"QAT","vendor_id":"8086","product_id":"0443","device_type":"type-PCI","numa_policy":"required"}'
GPU = {"name": "GPU", "vendor_id": "10de", "product_id": "1db4"}
VF = {"name": "VF", "vendor_id": "8086", "product_id": "154c", "device_type": "type-VF",
      "physical_network": "physnet1"}


def flavor(value):
    return {"extra_specs": {"pci_passthrough:alias": value}}


@pytest.fixture
def aliases():
    return parse_aliases([QAT, json.dumps(GPU), VF])


# --- aliases --------------------------------------------------------------------------

def test_reference_alias_as_written():
    (spec,) = parse_aliases([QAT])["QAT"]
    assert spec == AliasSpec("QAT", "8086", "0443", "type-PCI", "required")
    assert spec.to_spec() == {"vendor_id": "8086", "product_id": "0443", "dev_type": "type-PCI"}


def test_nova_docstring_alias_with_legacy_policy():
    text = """{
       "name": "QuickAssist",
       "product_id": "0443",
       "vendor_id": "8086",
       "device_type": "type-PCI",
       "numa_policy": "legacy"
       }"""
    assert parse_aliases([text])["QuickAssist"][0].numa_policy == "legacy"


def test_defaults_and_no_device_type():
    (spec,) = parse_aliases([GPU])["GPU"]
    assert spec.numa_policy == "legacy"
    assert spec.device_type is None
    assert "dev_type" not in spec.to_spec()


def test_alternatives_are_ored_in_order():
    a = parse_aliases([
        {"name": "QuickAssist", "vendor_id": "8086", "product_id": "0443", "device_type": "type-PCI"},
        {"name": "QuickAssist", "vendor_id": "8086", "product_id": "0442", "device_type": "type-PCI"},
    ])
    assert [s.product_id for s in a["QuickAssist"]] == ["0443", "0442"]
    (request,) = get_pci_requests_from_flavor(flavor("QuickAssist:1"), a)
    assert [alt["product_id"] for alt in request.spec] == ["0443", "0442"]


def test_extra_keys_become_tag_requirements():
    (spec,) = parse_aliases([VF])["VF"]
    assert spec.extra == {"physical_network": "physnet1"}
    assert spec.to_spec() == {"vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
                              "physical_network": "physnet1"}


def test_nova_optional_keys():
    (spec,) = parse_aliases([{"name": "a", "vendor_id": "8086", "product_id": "0443", "capability_type": "pci",
                              "live_migratable": "Yes", "trusted": True}])["a"]
    assert dict(spec.extra) == {"live_migratable": "true", "trusted": "true"}


@pytest.mark.parametrize("key", ["resource_class", "traits"])
def test_placement_keys_are_refused_not_silently_unmatchable(key):
    with pytest.raises(InvalidAlias, match="placement"):
        parse_aliases([{"name": "a", "vendor_id": "8086", "product_id": "0443", key: "CUSTOM_QAT"}])


def test_vendor_and_product_ids_are_required_as_in_nova_34():
    # Issue 10: Nova 34 (_validate_required_ids) refuses an alias without both ids.
    for raw in ({"name": "anyvf", "device_type": "type-VF"}, {"name": "intel", "vendor_id": "8086"},
                {"name": "p", "product_id": "0443"}):
        with pytest.raises(InvalidAlias, match="does not have vendor_id and product_id fields set"):
            parse_aliases([raw])
        with pytest.raises(InvalidAlias, match="does not have vendor_id and product_id fields set"):
            parse_alias(raw)


def test_uppercase_ids_and_padded_name():
    (spec,) = parse_aliases(['{"name": " a1 ", "vendor_id": "8086", "product_id": "154D"}'])["a1"]
    assert spec.product_id == "154d"


def test_one_json_string_holding_a_list():
    a = parse_aliases(json.dumps([GPU, VF]))
    assert sorted(a) == ["GPU", "VF"]
    assert parse_aliases(None) == {} and parse_aliases([]) == {}


def test_device_type_mismatch_exact_text():
    with pytest.raises(InvalidAlias) as info:
        parse_aliases([dict(GPU, device_type="type-PF"), dict(GPU, device_type="type-VF")])
    assert str(info.value) == "Device type mismatch for alias 'GPU'"


def test_device_type_missing_vs_given_is_a_mismatch():
    with pytest.raises(InvalidAlias, match="^Device type mismatch for alias 'GPU'$"):
        parse_aliases([GPU, dict(GPU, device_type="type-PCI")])


def test_numa_policy_mismatch():
    with pytest.raises(InvalidAlias, match="NUMA policy mismatch for alias 'GPU'"):
        parse_aliases([dict(GPU, numa_policy="required"), dict(GPU, numa_policy="preferred")])
    # an explicit "legacy" agrees with the default
    assert len(parse_aliases([GPU, dict(GPU, numa_policy="legacy")])["GPU"]) == 2


BAD_ALIASES = [
    ({"vendor_id": "8086", "product_id": "0443"}, "'name' is required"),
    ({"name": "", "vendor_id": "8086", "product_id": "0443"}, "'name' is empty"),
    ({"name": "   ", "vendor_id": "8086", "product_id": "0443"}, "'name' is empty"),
    ({"name": 5, "vendor_id": "8086", "product_id": "0443"}, "'name' must be a string"),
    ({"name": "a:b", "vendor_id": "8086", "product_id": "0443"}, "must not contain ':' or ','"),
    ({"name": "a,b", "vendor_id": "8086", "product_id": "0443"}, "must not contain ':' or ','"),
    ({"name": "x" * 257, "vendor_id": "8086", "product_id": "0443"}, "longer than 256"),
    ({"name": "a", "vendor_id": "808", "product_id": "0443"}, "'vendor_id' must be 4 hex digits, got '808'"),
    ({"name": "a", "vendor_id": "80866", "product_id": "0443"}, "'vendor_id' must be 4 hex digits"),
    ({"name": "a", "vendor_id": "*", "product_id": "0443"}, "'vendor_id' must be 4 hex digits, got '*'"),
    ({"name": "a", "vendor_id": "8086", "product_id": "04g3"}, "'product_id' must be 4 hex digits"),
    ({"name": "a", "vendor_id": 8086, "product_id": "0443"}, "'vendor_id' must be 4 hex digits, got 8086"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "device_type": "type-vdpa"}, "'device_type' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "device_type": "PCI"}, "'device_type' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "device_type": None}, "'device_type' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "numa_policy": "strict"}, "'numa_policy' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "numa_policy": ""}, "'numa_policy' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "numa_policy": "Required"}, "'numa_policy' must be"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "capability_type": "usb"}, "'capability_type'"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "live_migratable": "sure"}, "'live_migratable'"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "physical_network": 1}, "'physical_network' must"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "physical_network": None}, "'physical_network' must"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "Bad Key": "x"}, "extra key 'Bad Key'"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "dev_type": "type-VF"}, "use 'device_type'"),
    ({"name": "a", "vendor_id": "8086", "device_id": "0443", "product_id": "0443"}, "use 'product_id'"),
    ({"name": "a", "vendor_id": "8086", "product_id": "0443", "address": "*:0a:00.*"}, "unknown key 'address'"),
    (["not", "an", "object"], "expected a JSON object"),
    ("{bad json", "is not valid JSON"),
    (5, "expected a JSON object"),
]


@pytest.mark.parametrize("raw, fragment", BAD_ALIASES, ids=[str(r)[:60] for r, _ in BAD_ALIASES])
def test_bad_aliases(raw, fragment):
    config = [json.dumps(GPU), raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, dict) else raw]
    with pytest.raises(InvalidAlias) as info:
        parse_aliases(config)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValidationError)


def test_bad_alias_error_names_the_entry():
    with pytest.raises(InvalidAlias, match=r"alias entry 1 \('a'\): 'vendor_id'"):
        parse_aliases([GPU, {"name": "a", "vendor_id": "zz", "product_id": "0443"}])


def test_parse_alias_single():
    assert parse_alias(QAT).name == "QAT"


# --- flavor requests -------------------------------------------------------------------

def test_reference_extra_spec(aliases):
    requests = get_pci_requests_from_flavor(flavor("QAT:2, GPU:1"), aliases)
    assert [(r.alias_name, r.count, r.numa_policy, r.source) for r in requests] == [
        ("QAT", 2, "required", "flavor"), ("GPU", 1, "legacy", "flavor")]
    assert requests[0].spec == [{"vendor_id": "8086", "product_id": "0443", "dev_type": "type-PCI"}]
    ids = [r.request_id for r in requests]
    assert len(set(ids)) == 2
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.parametrize("value", ["QAT:2,GPU:1", " QAT : 2 ,  GPU:1 ", "QAT:02, GPU:1"])
def test_spaces_are_allowed(aliases, value):
    requests = get_pci_requests_from_flavor(flavor(value), aliases)
    assert [(r.alias_name, r.count) for r in requests] == [("QAT", 2), ("GPU", 1)]


def test_fresh_request_ids_each_time(aliases):
    first = get_pci_requests_from_flavor(flavor("QAT:1"), aliases)[0]
    second = get_pci_requests_from_flavor(flavor("QAT:1"), aliases)[0]
    assert first.request_id != second.request_id


def test_requests_do_not_share_spec_dicts(aliases):
    request = get_pci_requests_from_flavor(flavor("VF:1"), aliases)[0]
    request.spec[0]["physical_network"] = "changed"
    assert aliases["VF"][0].to_spec()["physical_network"] == "physnet1"


@pytest.mark.parametrize("f", [{}, {"extra_specs": None}, {"extra_specs": {}}, {"extra_specs": {"hw:cpu_policy": "x"}}])
def test_no_requests(f, aliases):
    assert get_pci_requests_from_flavor(f, aliases) == []


def test_affinity_policy_overrides(aliases):
    (request,) = get_pci_requests_from_flavor(flavor("QAT:1"), aliases, affinity_policy="preferred")
    assert request.numa_policy == "preferred"
    with pytest.raises(InvalidPciRequest, match="affinity policy"):
        get_pci_requests_from_flavor(flavor("QAT:1"), aliases, affinity_policy="strict")


@pytest.mark.parametrize("count", ["0", "-1", "x", "1.5", "", " ", "+1", "1e3", "１", "0x2"])
def test_bad_counts(aliases, count):
    with pytest.raises(InvalidPciRequest) as info:
        get_pci_requests_from_flavor(flavor(f"QAT:{count}"), aliases)
    assert "not a positive integer" in str(info.value)
    assert "QAT" in str(info.value)


@pytest.mark.parametrize("value", ["QAT", "QAT:1:2", ":1", " :1", "QAT:1,", ",QAT:1", "QAT:1,,GPU:1", "", "   "])
def test_malformed_pairs(aliases, value):
    with pytest.raises(InvalidPciRequest, match="is not 'name:count'"):
        get_pci_requests_from_flavor(flavor(value), aliases)


def test_extra_spec_not_a_string(aliases):
    with pytest.raises(InvalidPciRequest, match="must be a string"):
        get_pci_requests_from_flavor(flavor(2), aliases)


def test_undefined_alias(aliases):
    with pytest.raises(AliasNotDefined, match="'NOPE'"):
        get_pci_requests_from_flavor(flavor("QAT:1, NOPE:1"), aliases)


def test_an_alias_named_twice_in_the_extra_spec_is_two_requests(aliases):
    # Issue 10: Nova gives "QAT:1, GPU:1, QAT:2" three requests (it used to be refused here).
    requests = get_pci_requests_from_flavor(flavor("QAT:1, GPU:1, QAT:2"), aliases)
    assert [(r.alias_name, r.count) for r in requests] == [("QAT", 1), ("GPU", 1), ("QAT", 2)]
    assert len({r.request_id for r in requests}) == 3


@pytest.mark.parametrize("key", ["pci_passthrough:aliases", "pci_passthrough:", "pci_passthrough:Alias"])
def test_unknown_pci_passthrough_key(aliases, key):
    with pytest.raises(InvalidPciRequest, match=f"unknown key '{key}'"):
        get_pci_requests_from_flavor({"extra_specs": {key: "QAT:1"}}, aliases)


@pytest.mark.parametrize("f", [["x"], {"extra_specs": ["pci_passthrough:alias"]}])
def test_bad_flavor_shapes(aliases, f):
    with pytest.raises(InvalidPciRequest):
        get_pci_requests_from_flavor(f, aliases)


# --- instance metadata ---------------------------------------------------------------------

def test_save_get_delete(aliases):
    metadata: dict[str, str] = {}
    save_flavor_pci_info(metadata, flavor("QAT:2, GPU:1"), aliases)
    assert list(metadata) == ["pci_requests"]
    requests = get_instance_pci_requests({"system_metadata": metadata})
    assert [(r.alias_name, r.count) for r in requests] == [("QAT", 2), ("GPU", 1)]
    # stored ids are reloaded as they were
    assert [r.request_id for r in requests] == [d["request_id"] for d in json.loads(metadata["pci_requests"])]
    delete_flavor_pci_info(metadata, "")
    assert metadata == {}


def test_resize_keeps_a_second_set_under_a_prefix(aliases):
    metadata: dict[str, str] = {"other": "x"}
    save_flavor_pci_info(metadata, flavor("QAT:1"), aliases)
    save_flavor_pci_info(metadata, flavor("GPU:2"), aliases, prefix="new_")
    instance = {"system_metadata": metadata}
    assert [r.alias_name for r in get_instance_pci_requests(instance)] == ["QAT"]
    assert [(r.alias_name, r.count) for r in get_instance_pci_requests(instance, "new_")] == [("GPU", 2)]
    assert get_instance_pci_requests(instance, "old_") == []
    delete_flavor_pci_info(metadata, "new_", "old_")
    assert set(metadata) == {"other", "pci_requests"}
    delete_flavor_pci_info(metadata, "", "new_")
    assert metadata == {"other": "x"}


def test_save_writes_nothing_without_requests(aliases):
    metadata: dict[str, str] = {}
    save_flavor_pci_info(metadata, {"extra_specs": {}}, aliases)
    save_flavor_pci_info(metadata, {}, aliases, prefix="new_")
    assert metadata == {}


def test_get_without_metadata():
    assert get_instance_pci_requests({}) == []
    assert get_instance_pci_requests({"system_metadata": {}}) == []
    assert get_instance_pci_requests({"system_metadata": {"pci_requests": ""}}) == []


def test_get_accepts_old_db_rows(aliases):
    metadata: dict[str, str] = {}
    save_flavor_pci_info(metadata, flavor("GPU:1"), aliases)
    rows = [{"key": k, "value": v} for k, v in metadata.items()]
    assert [r.alias_name for r in get_instance_pci_requests({"system_metadata": rows})] == ["GPU"]


@pytest.mark.parametrize("stored", ["{", "{}", "[5]", '[{"count": 1}]', '[{"count": 0, "spec": [{}]}]'])
def test_get_bad_stored_requests(stored):
    with pytest.raises(InvalidPciRequest, match=r"system_metadata\['pci_requests'\]"):
        get_instance_pci_requests({"system_metadata": {"pci_requests": stored}})


# --- InstancePciRequest json ----------------------------------------------------------------

RID = "9f3c2a1b-5d6e-4f70-8192-a3b4c5d6e7f8"


def good():
    return {"count": 2, "spec": [{"vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
                                  "physical_network": "physnet1"}],
            "alias_name": "VF", "numa_policy": "required", "request_id": RID, "source": "flavor"}


def test_json_round_trip():
    request = InstancePciRequest.from_dict(good())
    assert InstancePciRequest.from_json(request.to_json()) == request
    assert request.to_dict() == good()
    assert requests_from_json(requests_to_json([request, request])) == [request, request]


def test_port_request_without_alias():
    request = InstancePciRequest(count=1, spec=[{"physical_network": "physnet2"}], request_id=RID, source="port")
    assert InstancePciRequest.from_json(request.to_json()).alias_name is None


BAD_REQUESTS = [
    ({"count": 0}, "'count' must be a positive integer"),
    ({"count": -1}, "'count'"),
    ({"count": "2"}, "'count'"),
    ({"count": True}, "'count'"),
    ({"count": 1.0}, "'count'"),
    ({"spec": []}, "'spec' must be a non-empty list"),
    ({"spec": {"vendor_id": "8086"}}, "'spec' must be a non-empty list"),
    ({"spec": ["x"]}, "spec[0] must be an object"),
    ({"spec": [{"vendor_id": "8086"}, {"vendor_id": "80866"}]}, "spec[1]: 'vendor_id' must be 4 lowercase hex"),
    ({"spec": [{"product_id": "154C"}]}, "'product_id' must be 4 lowercase hex"),
    ({"spec": [{"dev_type": "type-XX"}]}, "'dev_type' must be one of"),
    ({"spec": [{"physical_network": 5}]}, "'physical_network' must be a string"),
    ({"spec": [{"Bad Key": "x"}]}, "key 'Bad Key'"),
    ({"alias_name": ""}, "'alias_name'"),
    ({"alias_name": 5}, "'alias_name'"),
    ({"numa_policy": "strict"}, "'numa_policy' must be one of"),
    ({"request_id": "not-a-uuid"}, "'request_id'"),
    ({"request_id": RID.upper()}, "'request_id'"),
    ({"request_id": 5}, "'request_id'"),
    ({"source": "neutron"}, "'source' must be one of"),
    ({"extra": 1}, "unknown key(s): extra"),
]


@pytest.mark.parametrize("change, fragment", BAD_REQUESTS, ids=[str(c) for c, _ in BAD_REQUESTS])
def test_from_json_rejects_bad_data(change, fragment):
    raw = dict(good(), **change)
    with pytest.raises(InvalidPciRequest) as info:
        InstancePciRequest.from_json(json.dumps(raw))
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "5", '"x"', b"\xff"])
def test_from_json_rejects_non_objects(text):
    with pytest.raises(InvalidPciRequest):
        InstancePciRequest.from_json(text)


@pytest.mark.parametrize("missing", ["count", "spec"])
def test_from_json_requires_count_and_spec(missing):
    raw = good()
    del raw[missing]
    with pytest.raises(InvalidPciRequest, match=f"lacks '{missing}'"):
        InstancePciRequest.from_dict(raw)


def test_constructor_validates():
    with pytest.raises(InvalidPciRequest):
        InstancePciRequest(count=0, spec=[{}])


specs = st.lists(
    st.dictionaries(
        st.sampled_from(["vendor_id", "product_id", "dev_type", "physical_network", "trusted"]),
        st.just("x"),
    ).map(lambda d: {k: {"vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF"}.get(k, v)
                     for k, v in d.items()}),
    min_size=1, max_size=3,
)


@given(count=st.integers(1, 64), spec=specs, alias=st.one_of(st.none(), st.text(min_size=1, max_size=8)),
       policy=st.sampled_from(["required", "legacy", "preferred", "socket"]),
       rid=st.one_of(st.none(), st.uuids().map(str)), source=st.sampled_from(["flavor", "port"]))
def test_round_trip_property(count, spec, alias, policy, rid, source):
    request = InstancePciRequest(count, spec, alias, policy, rid, source)
    assert InstancePciRequest.from_json(request.to_json()) == request


# --- request_matches -------------------------------------------------------------------------

def device(vendor="8086", product="154c", dev_type="type-VF", **tags):
    return {"vendor_id": vendor, "product_id": product, "dev_type": dev_type, "tags": tags}


def test_request_matches_fields_and_tags(aliases):
    (request,) = get_pci_requests_from_flavor(flavor("VF:1"), aliases)
    assert request_matches(request.spec, device(physical_network="physnet1"))
    assert request_matches(request.spec, device(physical_network="PHYSNET1"))  # Nova ignores case
    assert not request_matches(request.spec, device(physical_network="physnet2"))
    assert not request_matches(request.spec, device())
    assert not request_matches(request.spec, device(dev_type="type-PF", physical_network="physnet1"))
    assert not request_matches(request.spec, device(product="154d", physical_network="physnet1"))


def test_request_matches_any_alternative():
    alternatives = [{"vendor_id": "8086", "product_id": "0443"}, {"vendor_id": "8086", "product_id": "0442"}]
    assert request_matches(alternatives, device(product="0442"))
    assert not request_matches(alternatives, device(product="0441"))
    assert not request_matches([], device())
    assert request_matches([{}], device())


def test_request_matches_dev_type_is_not_a_tag():
    assert not request_matches([{"dev_type": "type-VF"}], {"dev_type": "type-PCI", "tags": {"dev_type": "type-VF"}})


def test_request_matches_objects():
    class Dev:
        def __init__(self) -> None:
            self.vendor_id = "8086"
            self.product_id = "0443"
            self.dev_type = "type-PCI"
            self.tags = {"physical_network": "p"}

    assert request_matches([{"vendor_id": "8086", "physical_network": "p"}], Dev())
    assert not request_matches([{"vendor_id": "8086", "physical_network": "q"}], Dev())
