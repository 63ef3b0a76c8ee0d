"""`attnreid` commands of this area (registered on import)."""

from attnreid.cli._app import app  # noqa: F401
