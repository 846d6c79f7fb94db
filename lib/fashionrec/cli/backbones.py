"""``backbones``: list the backbones, built-in and registered."""
from __future__ import annotations

from ..models.registry import BACKBONES, list_backbones


def add_parser(commands) -> None:
    parser = commands.add_parser("backbones", help="list the backbones")
    parser.set_defaults(handler=run)


def run(args) -> int:
    for name in list_backbones():
        spec = BACKBONES[name]
        print(f"{name:<20} {spec.dim:>5}-d  {spec.description}")
    return 0
