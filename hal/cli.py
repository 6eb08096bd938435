"""The `hal` command: one subparser per subcommand, each handler imported only when it runs.

User mistakes (HalError) print `error: <message>` on stderr and exit 2, without a traceback.
Adding a subcommand: write `_add_NAME(sub)` and a handler `module:function(args) -> int`, and list
both in COMMANDS here (hal's own) or in `engine.commands.COMMANDS` (commands that need the engine).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from hal.errors import HalError

logger = logging.getLogger(__name__)


def _add_info(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="this machine's (or a profile's) capabilities and backend choices",
        description="Print the device, its dtypes and features, the optional libraries, the "
        "backend that would be chosen and, per op family, the implementation chosen and why "
        "every other one was passed over. Schema: docs/capabilities.md.",
    )
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="a known device (h100, t4, mi300x, ...; see platforms/profiles) or a .yaml file, "
        "instead of detecting this machine",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--yaml", action="store_true", help="print the report as YAML")
    p.add_argument(
        "--backend",
        metavar="NAME",
        help="require this backend (overrides HAL_BACKEND); fails with the reason if it cannot run",
    )
    return p


def run_info(args: argparse.Namespace) -> int:
    """`hal info`: build the report and print it in the requested format."""
    import platforms
    from hal import report

    caps = platforms.current_capabilities(args.profile)
    data = report.build_report(caps, backend=args.backend)
    report.add_settings(data, caps, backend=args.backend)
    if args.json:
        text = report.render_json(data) + "\n"
    elif args.yaml:
        text = report.render_yaml(data)
    else:
        text = report.render_table(data)
    sys.stdout.write(text)
    return 0


# name -> (adds the subparser, "module:function" handler imported when the command runs)
COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], str]] = {
    "info": (_add_info, "hal.cli:run_info"),
}

Commands = dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], str]]


def build_parser(commands: Commands | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hal",
        description="A multi-vendor LLM inference engine on a hardware abstraction layer.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add, handler) in (commands or COMMANDS).items():
        add(sub).set_defaults(handler=handler, command=name)
    return parser


def _load_handler(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None, commands: Commands | None = None) -> int:
    """Run one subcommand of `commands` (default: hal's own, `info`); returns the exit code.

    The `hal` script is `engine.commands:main`, which adds the engine's commands (generate, serve)
    from the layer above; hal itself never imports the engine.
    """
    args = build_parser(commands).parse_args(
        argv
    )  # argparse exits 2 with a usage line on bad flags
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_load_handler(args.handler)(args) or 0)
    except HalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hal info | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
