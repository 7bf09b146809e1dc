"""Host PCI passthrough with Nova's semantics.

Pure modules (no I/O): ``address`` (addresses and vocabulary), ``device``
(host device records and their state machine), ``devspec`` (the
``device_spec`` whitelist), ``request`` (aliases and flavor requests),
``stats`` (pools).  Adapters: ``discovery`` (libvirt node devices or sysfs)
and ``binding`` (vfio-pci).  Orchestration: ``tracker`` (``PciDevTracker``).
"""
