"""Boot planning, hot add, hot remove and reconcile: the two-phase orchestration.

Each operation follows one rule: persist the intent, act on QEMU, verify,
commit; undo in reverse on failure.  Every place is chosen through the VM's
:class:`~kvmslots.topology.Topology`, which applies all holders at once: the
VM's masks, our records (which know about devices being attached or detached
right now, and the ports and bridges we planned) and QEMU's live
``query-pci`` (which knows about devices someone else added).  A slot is free
only if all agree, and becomes free again only when removal is confirmed.

One module per operation: :mod:`.boot`, :mod:`.add`, :mod:`.remove`,
:mod:`.reconcile`, :mod:`.adopt` for a running VM kvmslots did not start, and
:mod:`.migrate` for live migration (the target starts with the source's devices).
These coroutines take a :class:`~kvmslots.store.Store` and a monitor as
arguments (anything that implements :class:`~kvmslots.monitor.MonitorLike`),
so a lifecycle manager can hand in its own connection and tests can hand in a
fault-injecting one. :mod:`kvmslots.sync` wraps them for callers that are not
async. """

from .add import hot_add, hot_add_group, hot_add_many
from .adopt import AdoptReport, adopt
from .boot import BootPlan, plan_boot
from .common import refuse_raw_passthrough
from .migrate import (
    IncomingConfirmed,
    IncomingPlan,
    abort_incoming,
    confirm_incoming,
    outgoing,
    plan_incoming,
    release_outgoing,
)
from .reconcile import ReconcileReport, reconcile
from .remove import HotDelResult, HotDelStatus, hot_del, watch_unplugs

__all__ = [
    "BootPlan",
    "HotDelStatus",
    "HotDelResult",
    "ReconcileReport",
    "plan_boot",
    "hot_add",
    "hot_add_group",
    "hot_add_many",
    "hot_del",
    "reconcile",
    "watch_unplugs",
    "adopt",
    "AdoptReport",
    "refuse_raw_passthrough",
    "IncomingPlan",
    "IncomingConfirmed",
    "outgoing",
    "plan_incoming",
    "confirm_incoming",
    "abort_incoming",
    "release_outgoing",
]
