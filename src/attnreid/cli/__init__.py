"""Command line: a thin shell over the Python API.

Each area registers its commands in its own module (``data``, ``metrics``, ``model``,
``train``, ``evaluate``, ``viz``, ``deploy``, ``robustness``, ``doctor``; :data:`COMMANDS` says which);
this module orders them into the groups of ``attnreid --help``. The modules are loaded
lazily: a command line loads only the module of the command it names (all of them for
``--help`` or a name to correct), so ``attnreid --version`` and ``attnreid metrics`` never
import torch. :func:`main` turns every :class:`~attnreid.errors.AttnReidError` into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from typing import List, Optional

from typer.core import TyperCommand
from typer.models import OptionInfo, ParameterInfo

from attnreid.cli._app import Command, OrderedGroup, app
from attnreid.errors import AttnReidError

# The module (under attnreid.cli) that registers each command or command group.
COMMANDS = {
    "data": "data",
    "train": "train",
    "eval": "evaluate",
    "extract": "evaluate",
    "demo": "evaluate",
    "metrics": "metrics",
    "compare": "compare",
    "report": "viz",
    "explain": "viz",
    "robustness": "robustness",
    "model-info": "model",
    "export": "deploy",
    "index": "deploy",
    "search": "deploy",
    "calibrate": "calibrate",
    "doctor": "doctor",
}


@app.command()
def version() -> None:
    """Print the attnreid, torch and numpy versions."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import numpy

    from attnreid import __version__

    try:
        torch_version = installed("torch")  # read from the package metadata: no 1.5 s torch import
    except PackageNotFoundError:
        torch_version = "not installed"
    print(f"attnreid {__version__} (torch {torch_version}, numpy {numpy.__version__})")


# The groups of `attnreid --help`, in the order a user meets them.
PANELS = (
    ("Data", ("data",)),
    ("Train and evaluate", ("train", "eval", "extract", "metrics", "demo")),
    ("Analysis", ("compare", "report", "explain", "robustness", "model-info")),
    ("Deploy", ("calibrate", "export", "index", "search")),
    ("Other", ("doctor", "version")),
)


def _plain_help(text: Optional[str]) -> Optional[str]:
    """Help text as typed: rich markup escaped (``[a,b]`` stays), paragraphs unwrapped so
    that the terminal wraps them, not the source's line breaks."""
    if not text:
        return text
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n")]
    if not any("[" in p or "\\" in p for p in paragraphs):
        return "\n\n".join(paragraphs)  # nothing rich would read as markup: no need to import it
    from rich.markup import escape

    return "\n\n".join(escape(p) for p in paragraphs)


def _tidy_params(callback) -> None:
    """Plain help for every option and argument; flags without a ``<bool>`` type column."""
    hints = typing.get_type_hints(callback)
    for name, param in inspect.signature(callback).parameters.items():
        info = param.default
        if not isinstance(info, ParameterInfo):
            continue
        info.help = _plain_help(info.help)
        is_bool = hints.get(name) in (bool, Optional[bool])
        if isinstance(info, OptionInfo) and is_bool and info.metavar is None:
            info.metavar = ""


_ARRANGED: set = set()  # commands and groups already arranged (commands load one module at a time)


def _arrange(typer_app=app, top: bool = True) -> None:
    """Panels and order of ``attnreid --help``; plain help text everywhere."""
    if top:
        OrderedGroup.order = {name: i for i, name in enumerate(n for _, names in PANELS for n in names)}
        panel_of = {name: title for title, names in PANELS for name in names}
    for info in typer_app.registered_commands:
        if id(info) in _ARRANGED:
            continue
        _ARRANGED.add(id(info))
        name = info.name or info.callback.__name__.replace("_", "-")
        if top:
            # A command not yet listed in PANELS still shows, last, under "Other" (a test flags it).
            info.rich_help_panel = panel_of.get(name, "Other")
        info.help = _plain_help(info.help or info.callback.__doc__)
        if info.cls in (None, TyperCommand):
            info.cls = Command
        _tidy_params(info.callback)
    for group in typer_app.registered_groups:
        if id(group) in _ARRANGED:
            continue
        _ARRANGED.add(id(group))
        if top:
            group.rich_help_panel = panel_of.get(group.name, "Other")
        group.help = _plain_help(group.help)
        group.typer_instance.info.cls = OrderedGroup
        _arrange(group.typer_instance, top=False)
    if top and typer_app.registered_callback is not None and id(typer_app.registered_callback) not in _ARRANGED:
        _ARRANGED.add(id(typer_app.registered_callback))
        _tidy_params(typer_app.registered_callback.callback)


def load_commands(argv: Optional[List[str]] = None) -> None:
    """Import the command modules a command line needs: the named command's, none for a bare
    ``--version``, all of them otherwise (``--help``, no command, a misspelt one)."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in args if not a.startswith("-")), None)
    if name in COMMANDS:
        modules = [COMMANDS[name]]
    elif name is None and "--version" in args:
        modules = []
    else:
        modules = sorted(set(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"attnreid.cli.{module}")
    _arrange()


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``attnreid`` console script."""
    from attnreid.cli._util import PipeSafeStream

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafeStream(sys.stdout), PipeSafeStream(sys.stderr)  # `... | head` keeps working
    try:
        load_commands(argv)
        app(args=argv, prog_name="attnreid")
    except AttnReidError as exc:
        from attnreid.distributed import error_prefix  # torch: imported when the command runs, not for --help

        prefix = error_prefix(exc)  # under torchrun: rank 0 speaks for the errors every rank meets
        if prefix is not None:
            print(f"{prefix}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    finally:
        sys.stdout, sys.stderr = streams


__all__ = ["COMMANDS", "PANELS", "app", "load_commands", "main"]
