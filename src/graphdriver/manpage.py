"""The ``graphdriver(1)`` manual page, generated from the command's argparse parser.

Owns the roff rendering only (``graphdriver man`` prints it); what the page says comes from the
parser's descriptions, help texts and examples, so it cannot drift from ``--help``.  Imports
nothing of graphdriver but the version; never imports drivers, the store or the archive engine.
"""

from __future__ import annotations

import argparse

from . import __version__

_TAIL = """\
.SH EXIT STATUS
0 on success; 1 on an error (one line on standard error); 2 on bad usage, and for
.B exists
when it cannot tell; 130 when interrupted by SIGINT or SIGTERM (the operation is rolled back).
.SH ENVIRONMENT
.TP
.B GRAPHDRIVER_ROOT
the default store root
.TP
.B XDG_DATA_HOME, XDG_RUNTIME_DIR
the default root and run root of a user other than root
.TP
.B GRAPHDRIVER_NO_NATIVE=1
use the pure-Python apply and export code instead of the compiled helpers
.SH FILES
.TP
.I /var/lib/graphdriver/<driver>/
the default store of root: layers and their records
.TP
.I /run/graphdriver/
mount reference counts
"""


def _roff(text: str) -> str:
    """Text as roff: backslashes doubled, a leading dot or quote made literal."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _options(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS or action.dest in skip:
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            name = ", ".join(f"\\fB{o}\\fR{metavar}" for o in action.option_strings)
        else:
            name = f"\\fI{action.metavar or action.dest}\\fR"
        lines += [".TP", _roff(name) if "\\f" not in name else name, _roff(action.help or "")]
    return lines


def _synopsis(parser: argparse.ArgumentParser, skip: set[str]) -> str:
    """A command's own arguments, as its usage line shows them (the common options left out)."""
    words = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in skip:
            continue
        metavar = str(action.metavar or action.dest)
        if action.option_strings:
            value = "" if action.nargs == 0 else f" {metavar}"
            words.append(f"[{action.option_strings[0]}{value}]")
        elif action.nargs == "+":
            words.append(f"{metavar}...")
        elif action.nargs == "?":
            words.append(f"[{metavar}]")
        elif action.choices:
            words.append("{" + ",".join(map(str, action.choices)) + "}")
        else:
            words.append(metavar)
    return " ".join(words)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def manpage(parser: argparse.ArgumentParser) -> str:
    """The page, in roff (``man -l -`` shows it)."""
    prog = parser.prog
    common = {a.dest for a in parser._actions if a.option_strings} - {"help", "version"}
    lines = [
        f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f".B {prog}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH OPTIONS",
        "Given before or after the command.",
        *_options(parser, set()),
        ".SH COMMANDS",
    ]
    for name, sub in _subcommands(parser).items():
        lines += [".SS " + name, _roff(sub.description or ""), ".PP",
                  f"\\fB{prog} {name}\\fR {_roff(_synopsis(sub, common))}"]
        own = _options(sub, common)
        if own:
            lines += [".RS", *own, ".RE"]
        if sub.epilog:
            lines += [".PP", ".nf", _roff(sub.epilog.rstrip()), ".fi"]
    return "\n".join(lines) + "\n" + _TAIL
