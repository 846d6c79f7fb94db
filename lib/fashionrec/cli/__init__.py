"""Command line: ``python -m fashionrec {evaluate,embed,index,recommend,duplicates,app,serve,backbones,data,distil,pipeline,params} ...``.

Machine-readable results go to stdout (``--json``: exactly one JSON object); progress
and diagnostics go to stderr, so ``... --json | jq`` always works. A mistake a user can
make (an unknown backbone, a missing file, a bad k) ends with one line on stderr that says
what is wrong and how to fix it, and a non-zero exit code; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from ..errors import FashionRecError, WeightsUnavailable
from .commands import SUMMARIES

EXIT_ERROR = 2
EXIT_WEIGHTS_UNAVAILABLE = 3


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, only that command's module is imported, the others are listed.

    A command module imports what it runs (torch, faiss, the notebooks' runner), several seconds
    that ``--help``, ``data`` or a mistyped command should not wait for.
    """
    parser = argparse.ArgumentParser(prog="python -m fashionrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in SUMMARIES.items():
        if command in (None, name):
            import_module(f"{__name__}.{name}").add_parser(commands)
        else:
            commands.add_parser(name, help=summary)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    asked = argv[0] if argv and argv[0] in SUMMARIES else ""
    args = build_parser(asked).parse_args(argv)
    try:
        return args.handler(args)
    except WeightsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WEIGHTS_UNAVAILABLE
    except FashionRecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader stopped early (``... | head``): nothing went wrong here. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
