"""Small helpers the QEMU integration tests share: stable device UUIDs, specs of devices that need
no backend (``virtio-rng-pci``, ``pci-testdev``), guest addresses, and a way to run a coroutine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvmslots import DeviceSpec

T = TypeVar("T")


def uid(n: int) -> str:
    """A valid UUID that says which device it is: n in its first and last digits."""
    return str(uuid.UUID(int=(n << 96) | 0x4000_8000_0000_0000_0000 | n))


def rng(n: int) -> DeviceSpec:
    return DeviceSpec(uid(n), "rng", "virtio-rng-pci")


def pci_testdev(n: int) -> DeviceSpec:
    return DeviceSpec(uid(n), "test", "pci-testdev")


def addr(bus: int, slot: int, function: int = 0) -> str:
    """The address the guest kernel shows under /sys/bus/pci/devices."""
    return f"0000:{bus:02x}:{slot:02x}.{function}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
