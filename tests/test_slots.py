"""SlotMap: the 32-slot reservation map (pure)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvmslots
from kvmslots import DEFAULT_PCI_RESERVATIONS, InvalidMask, InvalidSlot, SlotMap, SlotOccupied, SlotsExhausted
from kvmslots.errors import SlotReserved

masks = st.lists(st.booleans(), min_size=32, max_size=32).map(lambda bits: "".join("1" if b else "0" for b in bits))


def test_default_mask_reserves_slots_0_to_3():
    assert DEFAULT_PCI_RESERVATIONS == "1111" + "0" * 28
    slot_map = SlotMap()
    assert [slot_map.is_free(s) for s in range(5)] == [False] * 4 + [True]
    assert slot_map.first_free() == 4


def test_first_free_wins_and_release_reuses():
    slot_map = SlotMap()
    assert [slot_map.reserve() for _ in range(3)] == [4, 5, 6]
    slot_map.release(5)
    assert slot_map.reserve() == 5
    assert slot_map.reserve() == 7


def test_exhausted_and_occupied_errors_share_the_root():
    slot_map = SlotMap("1" * 31 + "0")
    assert slot_map.reserve() == 31
    with pytest.raises(SlotsExhausted, match="All PCI slots occupied"):
        slot_map.first_free()
    with pytest.raises(SlotOccupied, match="Slot 31 occupied"):
        slot_map.reserve(31)
    with pytest.raises(SlotReserved, match="Slot 2 occupied"):
        slot_map.reserve(2)
    assert issubclass(SlotsExhausted, kvmslots.KvmSlotsError)
    assert issubclass(SlotOccupied, kvmslots.KvmSlotsError)


@pytest.mark.parametrize("bad", ["1111", "1" * 33, "1111" + "2" * 28, " " * 32, None, 0b1111, list("0" * 32)])
def test_bad_masks_are_rejected(bad):
    with pytest.raises(InvalidMask):
        SlotMap(bad)


@pytest.mark.parametrize("bad", [-1, 32, 100, "5", 5.0, True, None])
def test_bad_slots_are_rejected(bad):
    slot_map = SlotMap()
    with pytest.raises(InvalidSlot):
        slot_map.reserve(bad) if bad is not None else slot_map.is_free(bad)
    assert slot_map.to01() == DEFAULT_PCI_RESERVATIONS


def test_release_of_a_masked_or_free_slot_is_an_error():
    slot_map = SlotMap()
    with pytest.raises(SlotReserved):
        slot_map.release(0)
    with pytest.raises(InvalidSlot):
        slot_map.release(9)


@given(mask=masks, ops=st.lists(st.one_of(st.just("take"), st.integers(0, 31)), max_size=120))
def test_property_no_slot_twice_mask_never_handed_out_released_reusable(mask, ops):
    slot_map = SlotMap(mask)
    held: set[int] = set()
    for op in ops:
        if op == "take":
            try:
                slot = slot_map.reserve()
            except SlotsExhausted:
                assert len(held) + mask.count("1") == 32
                continue
            assert slot not in held, "slot handed out twice"
            assert mask[slot] == "0", "masked slot handed out"
            assert slot == min(s for s in range(32) if mask[s] == "0" and s not in held), "not first free"
            held.add(slot)
        elif op in held:
            slot_map.release(op)
            held.discard(op)
            assert slot_map.is_free(op)
    assert set(slot_map.reserved()) == held | {s for s in range(32) if mask[s] == "1"}
