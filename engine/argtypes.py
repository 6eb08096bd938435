"""Command-line values given as JSON objects (`--speculative-config`, `--pooler-config`,
`--structured-outputs`): parsed, then checked by the option's own parser, so argparse reports a
bad value as a usage error with that parser's message."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def json_option(text: str, parse: Callable[[Any], Any], example: str) -> Any:
    """`parse(json.loads(text))`; not JSON, or a ValueError / TypeError from `parse`, is an
    argparse.ArgumentTypeError (the former shows `example`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); e.g. '{example}'") from e
    try:
        return parse(value)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e
