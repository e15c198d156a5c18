"""``deltalora <verb>``: one command whose verbs are the pipeline stages."""

from __future__ import annotations

import logging
import sys

import typer

from deltalora.cli import analysis, generators, stages  # noqa: F401 - importing registers the verbs
from deltalora.cli.app import app
from deltalora.errors import DeltaloraError

__all__ = ["app", "main"]


def main() -> None:
    """Run the CLI: a user mistake prints one line (exit 2); anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DeltaloraError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
