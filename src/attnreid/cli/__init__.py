"""Command line: a thin shell over the Python API.

Each area registers its commands in its own module (``data``, ``metrics``, ``model``,
``train``, ``evaluate``, ``viz``, ``deploy``, ``robustness``); this module orders them
into the groups of ``attnreid --help``. :func:`main` turns every
:class:`~attnreid.errors.AttnReidError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import inspect
import sys
import typing
from typing import List, Optional

from typer.core import TyperCommand
from typer.models import OptionInfo, ParameterInfo

from attnreid.cli._app import Command, OrderedGroup, app
from attnreid.cli import compare, data, deploy, evaluate, metrics, model, robustness, train, viz  # noqa: F401  (register commands)
from attnreid.errors import AttnReidError


@app.command()
def version() -> None:
    """Print the attnreid, torch and numpy versions."""
    import numpy
    import torch

    from attnreid import __version__

    print(f"attnreid {__version__} (torch {torch.__version__}, numpy {numpy.__version__})")


# The groups of `attnreid --help`, in the order a user meets them.
PANELS = (
    ("Data", ("data",)),
    ("Train and evaluate", ("train", "eval", "extract", "metrics", "demo")),
    ("Analysis", ("compare", "report", "explain", "robustness", "model-info")),
    ("Deploy", ("export", "index", "search")),
    ("Other", ("version",)),
)


def _plain_help(text: Optional[str]) -> Optional[str]:
    """Help text as typed: rich markup escaped (``[a,b]`` stays), paragraphs unwrapped so
    that the terminal wraps them, not the source's line breaks."""
    if not text:
        return text
    from rich.markup import escape

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(escape(" ".join(p.split())) for p in paragraphs)


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


def _arrange(typer_app=app, top: bool = True) -> None:
    """Panels and order of ``attnreid --help``; plain help text everywhere."""
    if top:
        OrderedGroup.order = {name: i for i, name in enumerate(n for _, names in PANELS for n in names)}
        panel_of = {name: title for title, names in PANELS for name in names}
    for info in typer_app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if top:
            # A command not yet listed in PANELS still shows, last, under "Other" (a test flags it).
            info.rich_help_panel = panel_of.get(name, "Other")
        info.help = _plain_help(info.help or info.callback.__doc__)
        if info.cls in (None, TyperCommand):
            info.cls = Command
        _tidy_params(info.callback)
    for group in typer_app.registered_groups:
        if top:
            group.rich_help_panel = panel_of.get(group.name, "Other")
        group.help = _plain_help(group.help)
        group.typer_instance.info.cls = OrderedGroup
        _arrange(group.typer_instance, top=False)
    if top and typer_app.registered_callback is not None:
        _tidy_params(typer_app.registered_callback.callback)


_arrange()


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``attnreid`` console script."""
    from attnreid.cli._util import PipeSafeStream

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafeStream(sys.stdout), PipeSafeStream(sys.stderr)  # `... | head` keeps working
    try:
        app(args=argv, prog_name="attnreid")
    except AttnReidError as exc:
        from attnreid.distributed import error_prefix

        prefix = error_prefix(exc)  # under torchrun: rank 0 speaks for the errors every rank meets
        if prefix is not None:
            print(f"{prefix}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    finally:
        sys.stdout, sys.stderr = streams


__all__ = ["PANELS", "app", "main"]
