"""The typer application that every command module registers on."""

from typing import Dict, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from attnreid import __version__


class _FlagHelp:
    """``--help`` is a flag: no ``<bool>`` type column next to it."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_FlagHelp, TyperCommand):
    """Every attnreid command."""


class OrderedGroup(_FlagHelp, TyperGroup):
    """Lists commands and command groups in one order (``attnreid.cli.PANELS``), not
    commands first and groups after, so that ``--help`` shows its panels in that order."""

    order: Dict[str, int] = {}

    def list_commands(self, ctx) -> List[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.order.get(n, len(self.order)))


app = typer.Typer(
    name="attnreid",
    help="Person re-identification with attention: MHSA-Net and HA-CNN.",
    cls=OrderedGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # every command inherits -h
)


def _print_version(value: bool) -> None:
    if value:
        print(f"attnreid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Person re-identification with attention: MHSA-Net and HA-CNN."""
