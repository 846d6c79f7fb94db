"""``backbones``: list the backbones, built-in and registered."""
from __future__ import annotations

from ..models.registry import backbone_spec, list_backbones, load_user_backbones
from ..models.views import VIEWS
from .commands import SUMMARIES
from .common import add_backbone_module_argument


def add_parser(commands) -> None:
    parser = commands.add_parser("backbones", help=SUMMARIES["backbones"])
    add_backbone_module_argument(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    for name in list_backbones():
        spec = backbone_spec(name)
        print(f"{name:<20} {spec.dim:>5}-d  {spec.family:<12} {spec.description}")
    print(f"\nCombine them: ensemble:<a>,<b>,... (concatenated), <backbone>@<view>+<view> (views averaged; views: "
          f"{', '.join(VIEWS)}); see docs/ensembles.md")
    return 0
