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


def stage_args(argv: list[str] | None, doc: str | None, config: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """A stage's command line: the config file (`config` describes which), key=value overrides
    (`.config`, `.overrides`), and whatever options `extra` adds."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=config)
    parser.add_argument("overrides", nargs="*", help="key=value dot-path overrides")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)
