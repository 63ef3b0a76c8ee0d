"""Command line: a thin shell over the Python API.

Each area registers its commands in its own module (``data``, ``metrics``, ``model``,
``train``, ``viz``, ``deploy``, ``robustness``). :func:`main` turns every
:class:`~attnreid.errors.AttnReidError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from attnreid.cli._app import app
from attnreid.cli import data, deploy, metrics, model, robustness, train, viz  # noqa: F401  (register commands)
from attnreid.errors import AttnReidError


@app.command()
def version() -> None:
    """Print the attnreid, torch and numpy versions."""
    import numpy
    import torch

    from attnreid import __version__

    print(f"attnreid {__version__} (torch {torch.__version__}, numpy {numpy.__version__})")


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``attnreid`` console script."""
    try:
        app(args=argv, prog_name="attnreid")
    except AttnReidError as exc:
        from attnreid.distributed import error_prefix

        prefix = error_prefix(exc)  # under torchrun: rank 0 speaks for the errors every rank meets
        if prefix is not None:
            print(f"{prefix}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


__all__ = ["app", "main"]
