"""The typer application that every command module registers on."""

import typer

app = typer.Typer(
    name="attnreid",
    help="Person re-identification with attention: MHSA-Net and HA-CNN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Person re-identification with attention: MHSA-Net and HA-CNN."""
