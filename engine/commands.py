"""The `hal` command: hal's own subcommands (info) plus the engine's (generate, serve)."""

from __future__ import annotations

import argparse
import sys

from hal import cli


def _add_generate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from engine.cli import add_generate  # argparse only; the engine loads when the command runs

    return add_generate(sub)


def _add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from engine.server.cli import add_serve  # argparse only; FastAPI/uvicorn load when it runs

    return add_serve(sub)


COMMANDS: cli.Commands = {
    **cli.COMMANDS,
    "generate": (_add_generate, "engine.cli:run_generate"),
    "serve": (_add_serve, "engine.server.cli:run_serve"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hal` script."""
    return cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
