"""``params``: the parameter-file schema (every key, type, default, meaning), and a check of a file."""
from __future__ import annotations

from ..pipeline.notebooks import pipeline_notebooks, read_params, use_backbone_modules
from ..pipeline.params import PARAMETERS, resolve_params, schema_markdown
from .commands import SUMMARIES


def add_parser(commands) -> None:
    parser = commands.add_parser("params", help=SUMMARIES["params"])
    parser.add_argument("--check", metavar="FILE", default=None,
                        help="check FILE against the schema (keys, types, paths, notebooks, backbone modules) and "
                             "print every value the pipeline would use")
    parser.add_argument("--markdown", action="store_true", help="print docs/parameters.md")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.markdown:
        print(schema_markdown(), end="")
        return 0
    if args.check:
        params = resolve_params(read_params(args.check), args.check)
        pipeline_notebooks(params["notebooks"], args.check)
        use_backbone_modules(params["backbone_modules"])
        for name, value in params.items():
            print(f"{name:<26} {value!r}")
        return 0
    for parameter in PARAMETERS:
        default = "required" if parameter.required else repr(parameter.default)
        print(f"{parameter.name:<26} {parameter.kind:<16} {default}")
    print("\nMeanings, and which notebook uses each key: docs/parameters.md (python -m fashionrec params --markdown)")
    return 0
