"""Sphinx directives generated from the code, so that the docs cannot fall behind it.

``.. argparse-commands:: module:function``
    Calls the function (it returns an :class:`argparse.ArgumentParser`) and writes one section per
    command, walking sub-commands recursively: its usage, its description (else the help it was
    registered with) and every argument as a ``.. option::`` under ``.. program:: PROG``, so pages
    can link to ``:option:`kvmslots plan --machine```.  A command added to the parser appears by
    itself.

``.. public-api:: module``
    An autosummary table of the module's ``__all__``, each name linked to where it is defined
    (``kvmslots.plan_boot`` is documented as ``kvmslots.hotplug.boot.plan_boot``); exceptions get
    a table of their own.

And three small autodoc fixes: a literal glued to a word (:func:`mend_literals`), dataclass
signatures with ``<factory>`` defaults (:func:`factory_defaults`) and data whose value is too long to
show (:class:`ShortDataDocumenter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
from typing import Any, Iterator

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.ext.autodoc import DataDocumenter, ModuleDocumenter
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import object_description
from sphinx.util.nodes import nested_parse_with_titles
from sphinx.util.rst import escape

USAGE_WIDTH = "88"  # argparse wraps usage to $COLUMNS; fixed so every build writes the same page
TITLE_MARKS = "-~^\"'"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None, argparse.ArgumentParser]]:
    """``(name, help, parser)`` of each sub-command, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name), sub


def _signature(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """``--device TYPE:UUID:DRIVER[:key=value,...]``, ``-o FILE, --output FILE`` or ``vm``."""
    if not action.option_strings:
        return formatter._metavar_formatter(action, action.dest)(1)[0]
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = formatter._format_args(action, action.dest.upper())
    # `.. option::` splits on ", ": a metavar such as "alias:count[, alias:count]" keeps a no-break space
    metavar = metavar.replace(", ", ",\u00a0")
    return ", ".join(f"{option} {metavar}" for option in action.option_strings)


def _sentence(text: str) -> str:
    """argparse help is a lower-case fragment; on a page it reads as a sentence."""
    text = text.strip()
    if not text:
        return text
    return text[0].upper() + text[1:] + ("" if text[-1] in ".!?" else ".")


def _notes(action: argparse.Action, parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    """What the parser enforces but the help may not say: required, choices, exclusions, repetition."""
    notes = []
    if action.required and action.option_strings:
        notes.append("Required.")
    if action.choices is not None:
        notes.append("One of " + ", ".join(f"``{choice}``" for choice in action.choices) + ".")
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            if group.required:
                names = ", ".join(f":option:`{a.option_strings[-1]}`" for a in group._group_actions)
                notes.append(f"Exactly one of {names} is required.")
            else:
                others = [a.option_strings[-1] for a in group._group_actions if a is not action]
                notes.append("Not together with " + ", ".join(f":option:`{o}`" for o in others) + ".")
    if isinstance(action, argparse._AppendAction) and "repeat" not in help_text:
        notes.append("Repeatable.")
    return notes


def _command_rst(prog: str, text: str | None, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    lines = [prog, TITLE_MARKS[depth] * len(prog), ""]
    if text:
        lines += [escape(_sentence(text)), ""]
    usage = parser.format_usage().strip()
    lines += [".. code-block:: text", "", *("   " + line for line in usage.splitlines()), ""]
    lines += [f".. program:: {prog}", ""]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        help_text = formatter._expand_help(action) if action.help else ""
        lines += [f".. option:: {_signature(action, formatter)}", ""]
        lines += [f"   {escape(_sentence(help_text))}", ""] if help_text else []
        notes = _notes(action, parser, help_text)
        lines += [f"   {' '.join(notes)}", ""] if notes else []
    for name, sub_help, sub in _subcommands(parser):
        lines += _command_rst(sub.prog, sub.description or sub_help, sub, depth + 1)
    return lines


class ArgparseCommands(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module_name, _, function_name = self.arguments[0].partition(":")
        module = importlib.import_module(module_name)
        self.env.note_dependency(inspect.getsourcefile(module) or "")
        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = USAGE_WIDTH
        try:
            parser = getattr(module, function_name)()
            lines = _command_rst(parser.prog, parser.description, parser, 0)
        finally:
            if saved is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = saved
        holder = nodes.section()
        holder.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<{self.arguments[0]}>"), holder)
        return holder.children


def _home(module_name: str, name: str, obj: object) -> str:
    """Where ``obj`` (exported by ``module_name`` as ``name``) is defined and documented."""
    defined_in = getattr(obj, "__module__", None)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{defined_in}.{obj.__qualname__}"
    # data: the non-package module below module_name whose __all__ lists it and holds the same object
    for candidate in sorted(m for m in _loaded(module_name)):
        module = importlib.import_module(candidate)
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is obj and not hasattr(module, "__path__"):
            return f"{candidate}.{name}"
    return f"{module_name}.{name}"


def _loaded(prefix: str) -> list[str]:
    return [m for m in sys.modules if m.startswith(prefix + ".")]


class PublicApi(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        names = list(module.__all__)
        errors = [n for n in names if inspect.isclass(getattr(module, n)) and issubclass(getattr(module, n), BaseException)]
        here = self.env.ref_context.get("py:module") or ""
        lines: list[str] = []
        for title, group in (("Functions, classes and constants", [n for n in names if n not in errors]),
                             ("Exceptions", errors)):
            if not group:
                continue
            lines += [f".. rubric:: {title}", "", ".. autosummary::", "   :nosignatures:", ""]
            homes = [_home(module_name, n, getattr(module, n)) for n in group]
            # relative to the page's module, as autosummary wants (the link still goes to the home)
            lines += [f"   ~{h.removeprefix(here + '.') if here else h}" for h in homes]
            lines += [""]
        holder = nodes.section()
        holder.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<public-api {module_name}>"), holder)
        return holder.children


_LITERAL = re.compile(r"``[^`]+?``")


def mend_literals(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    """``pcie-root-port``s: a literal glued to a letter is no literal in reST (it warns, or worse,
    pairs with the next one silently).  Read it as the writer meant, ``pcie-root-port``\\ s."""
    text = "\n".join(lines)

    def glue(match: re.Match[str]) -> str:
        after = text[match.end():match.end() + 1]
        return match.group(0) + ("\\ " if after.isalnum() else "")

    mended = _LITERAL.sub(glue, text)
    if mended != text:
        lines[:] = mended.split("\n")


def factory_defaults(
    app: Sphinx, what: str, name: str, obj: object, options: object, signature: str | None, annotation: str | None
) -> tuple[str | None, str | None] | None:
    """A dataclass field's ``<factory>`` default becomes ``dict()``, ``list()``...: the signature then
    parses as Python again, so its annotations are rendered and linked instead of printed raw."""
    if what != "class" or not signature or "<factory>" not in signature or not dataclasses.is_dataclass(obj):
        return None
    for field in dataclasses.fields(obj):
        if field.init and field.default_factory is not dataclasses.MISSING:
            factory = getattr(field.default_factory, "__name__", "")
            signature = signature.replace("<factory>", f"{factory}()" if factory.isidentifier() else "...", 1)
    return signature, annotation


class ShortDataDocumenter(DataDocumenter):
    """Module data as autodoc shows it, with two changes: data a module exports in ``__all__`` is
    documented even without a ``#:`` comment (autodoc skips undocumented module data whatever
    ``undoc-members`` says; it then gets no docstring rather than its type's), and a value longer than
    a line (a table of SQL, a transition map) is left to its docstring and the source link."""

    MAX_VALUE = 100

    @classmethod
    def can_document_member(cls, member: Any, membername: str, isattr: bool, parent: Any) -> bool:
        if super().can_document_member(member, membername, isattr, parent):
            return True
        exported = membername in getattr(getattr(parent, "object", None), "__all__", ())
        return (isinstance(parent, ModuleDocumenter) and exported
                and not (inspect.isclass(member) or inspect.isroutine(member) or inspect.ismodule(member)))

    def get_doc(self) -> list[list[str]] | None:
        if self.get_module_comment(self.objpath[-1]) is None:
            return []  # without a `#:` comment, autodoc would show str's or dict's docstring
        return super().get_doc()

    def should_suppress_value_header(self) -> bool:
        if super().should_suppress_value_header():
            return True
        try:
            return len(object_description(self.object)) > self.MAX_VALUE
        except Exception:  # an object whose repr fails is not worth a broken build
            return True


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("argparse-commands", ArgparseCommands)
    app.add_directive("public-api", PublicApi)
    app.connect("autodoc-process-docstring", mend_literals)
    app.connect("autodoc-process-signature", factory_defaults)
    app.add_autodocumenter(ShortDataDocumenter, override=True)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
