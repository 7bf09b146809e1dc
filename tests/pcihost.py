"""Host device lists in Nova's hypervisor JSON format, for tracker tests."""

from __future__ import annotations

from typing import Any

PF_PRODUCT, VF_PRODUCT, PLAIN_PRODUCT = "1572", "154c", "0443"


def pf_addr(p: int) -> str:
    return f"0000:{0x81 + p:02x}:00.0"


def vf_addr(p: int, v: int) -> str:
    return f"0000:{0x81 + p:02x}:{0x02 + v // 8:02x}.{v % 8}"


def plain_addr(n: int) -> str:
    return f"0000:{0x0a + n:02x}:00.0"


def host(pfs: int = 2, vfs: int = 4, plain: int = 2, numa: bool = True) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = []
    for p in range(pfs):
        node = p % 2 if numa else None
        devices.append({"address": pf_addr(p), "vendor_id": "8086", "product_id": PF_PRODUCT,
                        "dev_type": "type-PF", "numa_node": node,
                        "dev_id": "pci_" + pf_addr(p).replace(":", "_").replace(".", "_"),
                        "label": f"label_8086_{PF_PRODUCT}"})
        for v in range(vfs):
            devices.append({"address": vf_addr(p, v), "vendor_id": "8086", "product_id": VF_PRODUCT,
                            "dev_type": "type-VF", "parent_addr": pf_addr(p), "numa_node": node,
                            "label": f"label_8086_{VF_PRODUCT}"})
    for n in range(plain):
        devices.append({"address": plain_addr(n), "vendor_id": "8086", "product_id": PLAIN_PRODUCT,
                        "dev_type": "type-PCI", "numa_node": n % 2 if numa else None, "iommu_group": 40 + n})
    return devices


def request(kind: str, count: int = 1, request_id: str | None = None, policy: str = "legacy", **tags: str):
    from kvmslots.pci.request import InstancePciRequest

    product = {"type-PF": PF_PRODUCT, "type-VF": VF_PRODUCT, "type-PCI": PLAIN_PRODUCT}[kind]
    import uuid

    return InstancePciRequest(
        count=count,
        spec=[{"vendor_id": "8086", "product_id": product, "dev_type": kind, **tags}],
        alias_name=kind.lower(),
        numa_policy=policy,
        request_id=request_id or str(uuid.uuid4()),
        source="flavor",
    )
