"""User-facing errors (one line, exit code 2, no traceback) and the stages' command line."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input or configuration; the message names the file, row or key."""


def cli(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage's main so a UserError prints one line and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def stage_args(argv: list[str] | None, doc: str | None, config: str) -> tuple[str, list[str]]:
    """A stage's command line: the config file (`config` describes which) and key=value overrides."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=config)
    parser.add_argument("overrides", nargs="*", help="key=value dot-path overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides
