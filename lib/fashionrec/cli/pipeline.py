"""``pipeline``: run the numbered notebooks with papermill from a parameter file."""
from __future__ import annotations

from ..pipeline.notebooks import run_pipeline
from .commands import SUMMARIES


def add_parser(commands) -> None:
    parser = commands.add_parser("pipeline", help=SUMMARIES["pipeline"])
    parser.add_argument("--params", default="params/default.yaml",
                        help="YAML parameter file; its keys are listed in docs/parameters.md")
    parser.add_argument("--run-name", default=None, help="results/<run-name>/ (default: run_name in the file, "
                                                         "else the file's name)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    return run_pipeline(args.params, run_name=args.run_name)
