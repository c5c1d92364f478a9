"""User-facing errors (one line, exit code 2, no traceback), Ctrl-C (one line, exit code 130)
and the stages' command line."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

_prog: list[str] = []  # the running stage's command, `python -m pipeline.<stage>`, set by cli


class UserError(Exception):
    """Bad input or configuration; the message names the file, row or key."""


def cli(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage's main: a UserError prints one line and exits with code 2; Ctrl-C prints
    one line (the stage may say where it will resume) and exits with code 130."""
    spec = main.__globals__.get("__spec__")
    prog = f"python -m {spec.name}" if spec is not None else None

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        _prog.append(prog)
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as stop:
            where = f": {stop}" if str(stop) else ""
            print(f"interrupted{where}", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            _prog.pop()

    return wrapper


def stage_args(argv: list[str] | None, doc: str | None, config: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """A stage's command line: the config file (`config` describes which), optional key=value
    overrides (`.config`, `.overrides`), and whatever options `extra` adds, in any order."""
    parser = argparse.ArgumentParser(prog=_prog[-1] if _prog else None, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=config)
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="dot-path overrides, e.g. train.epochs=3 (optional)")
    if extra is not None:
        extra(parser)
    return parser.parse_intermixed_args(argv)
