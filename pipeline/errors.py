"""User-facing errors: one line, exit code 2, no traceback."""
from __future__ import annotations

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
