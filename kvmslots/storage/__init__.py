"""Where kvmslots keeps its state: the stores named by intent and their two backends.

:mod:`.base` declares what the rest of kvmslots asks of a store (slot
records, host device inventories, VM locks); :mod:`.sql` implements it once in
SQL that both engines accept; :mod:`.sqlite` (the embedded default) and
:mod:`.postgres` (many hosts in one database) are the backends, and
:mod:`.schema` is their one schema.  Callers open a store through
:class:`kvmslots.store.Store`.
"""
