"""kvmslots: stable PCI slots and reproducible device ids for QEMU/KVM VMs.

A VM lifecycle manager calls :func:`plan_boot` before it starts a VM (every
device gets a stored slot and a ``<type>-<uuid8>-pci-<slot>`` id, and the
``-device`` arguments come back), and :func:`hot_add` / :func:`hot_del` /
:func:`reconcile` while it runs; :func:`adopt` takes over a VM that is
already running; :func:`outgoing`, :func:`plan_incoming`,
:func:`confirm_incoming` and :func:`release_outgoing` carry it through a live
migration.  Occupancy always combines the VM's
reservation mask, our records and QEMU's live ``query-pci``; a slot is
released only when QEMU confirms the removal.

The core is asyncio (qemu.qmp is); :class:`SlotManager` is the synchronous
facade.  Every error derives from :class:`KvmSlotsError`.
"""

from __future__ import annotations

import logging

from .capabilities import QemuCapabilities
from .devid import device_id, parse_device_id
from .errors import *  # noqa: F401,F403 - the exception tree is part of the API
from .errors import __all__ as _errors_all
from .hotplug import (
    AdoptReport,
    BootPlan,
    HotDelResult,
    HotDelStatus,
    IncomingPlan,
    ReconcileReport,
    abort_incoming,
    adopt,
    confirm_incoming,
    hot_add,
    hot_add_group,
    hot_add_many,
    hot_del,
    outgoing,
    plan_boot,
    plan_incoming,
    reconcile,
    release_outgoing,
    watch_unplugs,
)
from .model import Controller, ControllerKind, Device, DeviceGroup, DeviceSpec, DeviceState, Machine, VMSpec
from .monitor import Monitor
from .pciview import PciFunction, PciOccupancy, parse_info_pci, parse_query_pci
from .slots import DEFAULT_PCI_RESERVATIONS, SlotMap
from .store import Store
from .sync import SlotManager
from .topology import Topology

__version__ = "0.4.0"

__all__ = [
    "plan_boot",
    "hot_add",
    "hot_add_many",
    "hot_add_group",
    "hot_del",
    "reconcile",
    "watch_unplugs",
    "adopt",
    "AdoptReport",
    "outgoing",
    "plan_incoming",
    "confirm_incoming",
    "abort_incoming",
    "release_outgoing",
    "IncomingPlan",
    "SlotManager",
    "Store",
    "Monitor",
    "DeviceSpec",
    "DeviceGroup",
    "VMSpec",
    "Machine",
    "Controller",
    "ControllerKind",
    "Topology",
    "QemuCapabilities",
    "Device",
    "DeviceState",
    "BootPlan",
    "HotDelResult",
    "HotDelStatus",
    "ReconcileReport",
    "SlotMap",
    "DEFAULT_PCI_RESERVATIONS",
    "device_id",
    "parse_device_id",
    "parse_query_pci",
    "parse_info_pci",
    "PciOccupancy",
    "PciFunction",
    *_errors_all,
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
