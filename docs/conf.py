"""Sphinx configuration of the kvmslots documentation.

Build (warnings are errors, as in CI)::

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]  # the checkout's kvmslots, then our extension

import kvmslots  # noqa: E402

project = "kvmslots"
author = "the kvmslots authors"
copyright = "the kvmslots authors; Apache-2.0"
release = kvmslots.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
    "kvmslots_docs",  # docs/_ext: the CLI reference from the argument parser, the public-API table
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
default_role = "code"  # a lone `x` is code, as in the docstrings' habits, never a broken reference
nitpicky = False  # unresolved references (types from qemu.qmp, the standard library) stay plain text

# autodoc: every module page lists its __all__ (or its public definitions) in source order, with
# or without a docstring (an undocumented public method still has a signature worth showing).
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # `timeout=DEFAULT_TIMEOUT`, not its value
autodoc_class_signature = "mixed"
# psycopg and libvirt (the optional extras) are imported lazily by kvmslots, so the docs build without
# them and need no autodoc_mock_imports.
autosummary_generate = False  # the tables link to the module pages; no stub pages

html_theme = "alabaster"
html_title = f"kvmslots {release}"
html_theme_options = {
    "description": "Stable PCI slots, reproducible device ids and safe hotplug for QEMU/KVM VMs",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_static_path: list[str] = []
html_show_sourcelink = False
