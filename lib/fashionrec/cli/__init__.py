"""Command line: ``python -m fashionrec {evaluate,embed,index,recommend,app,backbones,data,pipeline,params} ...``.

Machine-readable results go to stdout (``--json``: exactly one JSON object); progress
and diagnostics go to stderr, so ``... --json | jq`` always works. A mistake a user can
make (an unknown backbone, a missing file, a bad k) ends with one line on stderr that says
what is wrong and how to fix it, and a non-zero exit code; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import FashionRecError, WeightsUnavailable
from . import app, backbones, data, embed, evaluate, index, params, pipeline, recommend

EXIT_ERROR = 2
EXIT_WEIGHTS_UNAVAILABLE = 3
COMMANDS = (evaluate, embed, index, recommend, app, backbones, data, pipeline, params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fashionrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
