"""``data``: find or fetch the named datasets, each on its own."""
from __future__ import annotations

import sys

from ..data.fetch import FETCHABLE, ensure_dataset
from ..errors import DatasetError
from .commands import SUMMARIES


def add_parser(commands) -> None:
    parser = commands.add_parser("data", help=SUMMARIES["data"])
    parser.add_argument("--dataset", action="append", choices=FETCHABLE,
                        help="a dataset to make available (repeatable; default: all of them)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    failed = 0
    for name in args.dataset or FETCHABLE:
        try:
            print(f"{name}: {ensure_dataset(name)}")
        except DatasetError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
